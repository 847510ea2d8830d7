// The one place where ops are declared (schemas) and bound to devices, plus
// the small pybind11 API that exposes the format table to Python.
#include <torch/extension.h>
#include <torch/library.h>

#include "cpu/simd.h"
#include "kvcomp/spec.h"
#include "ops/common.h"
#include "ops/ops.h"

TORCH_LIBRARY(kvcomp, m) {
  m.def("quantize_write(Tensor key, Tensor value, Tensor(a!) pool, Tensor slot_mapping, "
        "str format) -> ()");
  m.def("seal_blocks(Tensor hot_pool, Tensor src_blocks, Tensor(a!) cold_pool, "
        "Tensor dst_blocks, str hot_format, str cold_format) -> ()");
  m.def("paged_decode_attention(Tensor query, Tensor pool, Tensor block_tables, "
        "Tensor seq_lens, str format, float scale, Tensor(a!)? logits_out=None) "
        "-> (Tensor out, Tensor lse)");
  m.def("merge_attention_states(Tensor out_a, Tensor lse_a, Tensor out_b, Tensor lse_b) "
        "-> (Tensor out, Tensor lse)");
  m.def("accumulate_scores(Tensor logits, Tensor lse, Tensor seq_lens, Tensor(a!) scores) -> ()");
  m.def("heavy_hitter_topk(Tensor scores, Tensor seq_lens, int k) -> Tensor");
  m.def("compact(Tensor(a!) pool, Tensor block_tables, Tensor keep, str format) -> ()");
  m.def("gather_dequant(Tensor pool, Tensor block_tables, Tensor seq_lens, str format, "
        "ScalarType dtype) -> (Tensor key, Tensor value)");
}

TORCH_LIBRARY_IMPL(kvcomp, CPU, m) {
  using namespace kvcomp::op;
  m.impl("quantize_write", &quantize_write);
  m.impl("seal_blocks", &seal_blocks);
  m.impl("paged_decode_attention", &paged_decode_attention);
  m.impl("merge_attention_states", &merge_attention_states);
  m.impl("accumulate_scores", &accumulate_scores);
  m.impl("heavy_hitter_topk", &heavy_hitter_topk);
  m.impl("compact", &compact);
  m.impl("gather_dequant", &gather_dequant);
}

namespace {

pybind11::dict describe(const std::string& spec) {
  const kvcomp::FormatSpec& f = kvcomp::spec_arg(spec);
  auto side = [](kvcomp::ElemFormat e) {
    pybind11::dict d;
    d["spec"] = kvcomp::side_name(e);
    d["bits"] = kvcomp::kind_bits(e.kind);
    d["group"] = e.group;
    d["per_channel"] = kvcomp::is_per_channel(e.kind);
    d["rotated"] = e.rotated;
    d["meta_halves"] = kvcomp::is_raw(e.kind) ? 0 : kvcomp::meta_halves(e.kind);
    d["code_range"] = kvcomp::is_raw(e.kind) ? pybind11::tuple()
        : pybind11::tuple(pybind11::make_tuple(kvcomp::code_value_min(e.kind), kvcomp::code_value_max(e.kind)));
    return d;
  };
  pybind11::dict d;
  d["name"] = f.name;
  d["k"] = side(f.k);
  d["v"] = side(f.v);
  return d;
}

pybind11::dict layout(const std::string& spec, int head_dim, int block_size) {
  const kvcomp::FormatSpec& f = kvcomp::spec_arg(spec);
  kvcomp::TileLayout t =
      kvcomp::guarded([&] { return kvcomp::tile_layout(f, head_dim, block_size); });
  auto sec = [](const kvcomp::Section& s) {
    pybind11::dict d;
    d["offset"] = s.offset;
    d["row_bytes"] = s.row_bytes;
    d["data_bytes"] = s.data_bytes;
    d["meta_offset"] = s.meta_offset();
    d["meta_bytes"] = s.meta_bytes;
    return d;
  };
  pybind11::dict d;
  d["k"] = sec(t.k);
  d["v"] = sec(t.v);
  d["natural_bytes"] = t.natural_bytes;
  d["tile_bytes"] = kvcomp::tile_bytes(f, head_dim, block_size);
  return d;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.attr("LAYOUT_VERSION") = kvcomp::kLayoutVersion;
  m.def("describe_format", &describe, "Canonical name and per-side facts of a format spec");
  m.def("tile_bytes", [](const std::string& spec, int head_dim, int block_size) {
    const kvcomp::FormatSpec& f = kvcomp::spec_arg(spec);
    return kvcomp::guarded([&] { return kvcomp::tile_bytes(f, head_dim, block_size); });
  });
  m.def("infer_geometry", [](const std::string& spec, long long tile, int head_dim) {
    const kvcomp::FormatSpec& f = kvcomp::spec_arg(spec);
    auto g = kvcomp::guarded([&] { return kvcomp::infer_geometry(f, tile, head_dim); });
    return std::make_pair(g.head_dim, g.block_size);
  }, pybind11::arg("spec"), pybind11::arg("tile_bytes"), pybind11::arg("head_dim") = 0);
  m.def("tile_layout", &layout, "Byte offsets of a tile's regions");
  m.def("storable_max", [](const std::string& spec, int head_dim) {
    const kvcomp::FormatSpec& f = kvcomp::spec_arg(spec);
    return std::make_pair(kvcomp::storable_max(f.k, head_dim), kvcomp::storable_max(f.v, head_dim));
  }, "The largest |x| the K and V sides store (format.h storable_max)");
  m.def("set_cuda_validation", &kvcomp::set_cuda_validation, pybind11::arg("enabled"),
        "Turns the host-side data checks of the CUDA ops on or off (see ops/common.h)");
  m.def("cuda_validation", &kvcomp::cuda_validation, "Whether the CUDA ops check data on the host");
  m.def("with_cuda", [] {
#ifdef KVCOMP_WITH_CUDA
    return true;
#else
    return false;
#endif
  }, "Whether the CUDA kernels were built");
  m.def("cpu_isa", [] {
#ifdef KVCOMP_AVX2
    return "avx2";
#else
    return "portable";
#endif
  }, "The instruction set the CPU kernels were built for");
}
