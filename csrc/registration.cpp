// The one place where ops are declared (schemas) and bound to devices, on the
// LibTorch stable ABI (STABLE_TORCH_LIBRARY, TORCH_BOX), plus the host-only
// helpers of the Python API (kvcomp_host: format facts, build facts, the CUDA
// validation switch) and the empty Python module whose import loads it all.
// No pybind11 and only the limited Python API: one cp310-abi3 binary serves
// every Python >= 3.10 and every torch from TORCH_TARGET_VERSION on.
#include <Python.h>
#include <torch/csrc/stable/library.h>

#include <sstream>
#include <vector>

#include "cpu/simd.h"
#include "kvcomp/spec.h"
#include "ops/common.h"
#include "ops/ops.h"

STABLE_TORCH_LIBRARY(kvcomp, m) {
  m.def("quantize_write(Tensor key, Tensor value, Tensor(a!) pool, Tensor slot_mapping, "
        "str format) -> ()");
  m.def("seal_blocks(Tensor hot_pool, Tensor src_blocks, Tensor(a!) cold_pool, "
        "Tensor dst_blocks, str hot_format, str cold_format) -> ()");
  m.def("paged_decode_attention(Tensor query, Tensor pool, Tensor block_tables, "
        "Tensor seq_lens, str format, float scale, Tensor(a!)? logits_out=None, float softcap=0.0) "
        "-> (Tensor out, Tensor lse)");
  m.def("merge_attention_states(Tensor out_a, Tensor lse_a, Tensor out_b, Tensor lse_b) "
        "-> (Tensor out, Tensor lse)");
  m.def("accumulate_scores(Tensor logits, Tensor lse, Tensor seq_lens, Tensor(a!) scores) -> ()");
  m.def("heavy_hitter_topk(Tensor scores, Tensor seq_lens, int k) -> Tensor");
  m.def("compact(Tensor(a!) pool, Tensor block_tables, Tensor keep, str format) -> ()");
  m.def("gather_dequant(Tensor pool, Tensor block_tables, Tensor seq_lens, str format, "
        "ScalarType dtype) -> (Tensor key, Tensor value)");
}

STABLE_TORCH_LIBRARY_IMPL(kvcomp, CPU, m) {
  using namespace kvcomp::op;
  KVCOMP_IMPL_EVERY_OP(m);
}

namespace kvcomp::host {

// Small JSON objects of ints, bools and ASCII names (no escaping needed).
struct Json {
  std::ostringstream s;
  bool first = true;
  template <class T>
  Json& put(const char* key, const T& v) {
    s << (first ? "{" : ", ") << '"' << key << "\": " << v;
    first = false;
    return *this;
  }
  Json& str(const char* key, const std::string& v) { return put(key, '"' + v + '"'); }
  Json& flag(const char* key, bool v) { return put(key, v ? "true" : "false"); }
  std::string done() { return first ? "{}" : s.str() + "}"; }
};

std::string describe_format(std::string spec) {
  const FormatSpec& f = spec_arg(spec);
  auto side = [](ElemFormat e) {
    Json j;
    j.str("spec", side_name(e)).put("bits", kind_bits(e.kind)).put("group", e.group);
    j.flag("per_channel", is_per_channel(e.kind)).flag("rotated", e.rotated);
    j.put("meta_halves", is_raw(e.kind) ? 0 : meta_halves(e.kind));
    if (is_raw(e.kind)) j.put("code_range", "[]");
    else j.put("code_range", "[" + std::to_string(code_value_min(e.kind)) + ", " +
                                 std::to_string(code_value_max(e.kind)) + "]");
    return j.done();
  };
  return Json().str("name", f.name).put("k", side(f.k)).put("v", side(f.v)).done();
}

int64_t tile_bytes_of(std::string spec, int64_t head_dim, int64_t block_size) {
  return tile_bytes(spec_arg(spec), (int)head_dim, (int)block_size);
}

std::string tile_layout_of(std::string spec, int64_t head_dim, int64_t block_size) {
  const FormatSpec& f = spec_arg(spec);
  TileLayout t = tile_layout(f, (int)head_dim, (int)block_size);
  auto sec = [](const Section& s) {
    return Json().put("offset", s.offset).put("row_bytes", s.row_bytes)
        .put("data_bytes", s.data_bytes).put("meta_offset", s.meta_offset())
        .put("meta_bytes", s.meta_bytes).done();
  };
  return Json().put("k", sec(t.k)).put("v", sec(t.v)).put("natural_bytes", t.natural_bytes)
      .put("tile_bytes", tile_bytes(f, (int)head_dim, (int)block_size)).done();
}

std::vector<int64_t> infer_geometry_of(std::string spec, int64_t tile, int64_t head_dim) {
  Geometry g = infer_geometry(spec_arg(spec), tile, (int)head_dim);
  return {g.head_dim, g.block_size};
}

std::vector<double> storable_max_of(std::string spec, int64_t head_dim) {
  const FormatSpec& f = spec_arg(spec);
  return {storable_max(f.k, (int)head_dim), storable_max(f.v, (int)head_dim)};
}

// Sets the switch and returns its previous state.
bool set_cuda_validation_to(bool enabled) {
  bool previous = cuda_validation();
  set_cuda_validation(enabled);
  return previous;
}
bool get_cuda_validation() { return cuda_validation(); }

std::string build_info() {
#ifdef KVCOMP_WITH_CUDA
  const bool with_cuda = true;
#else
  const bool with_cuda = false;
#endif
#ifdef KVCOMP_AVX2
  const char* isa = "avx2";
#else
  const char* isa = "portable";
#endif
  return Json().put("layout_version", kLayoutVersion).flag("with_cuda", with_cuda)
      .str("cpu_isa", isa).done();
}

}  // namespace kvcomp::host

STABLE_TORCH_LIBRARY(kvcomp_host, m) {
  m.def("describe_format(str spec) -> str");
  m.def("tile_bytes(str spec, int head_dim, int block_size) -> int");
  m.def("tile_layout(str spec, int head_dim, int block_size) -> str");
  m.def("infer_geometry(str spec, int tile_bytes, int head_dim) -> int[]");
  m.def("storable_max(str spec, int head_dim) -> float[]");
  m.def("set_cuda_validation(bool enabled) -> bool");
  m.def("cuda_validation() -> bool");
  m.def("build_info() -> str");
}

// No tensor arguments: the dispatcher runs the CompositeExplicitAutograd kernel.
STABLE_TORCH_LIBRARY_IMPL(kvcomp_host, CompositeExplicitAutograd, m) {
  using namespace kvcomp::host;
  m.impl("describe_format", TORCH_BOX(&describe_format));
  m.impl("tile_bytes", TORCH_BOX(&tile_bytes_of));
  m.impl("tile_layout", TORCH_BOX(&tile_layout_of));
  m.impl("infer_geometry", TORCH_BOX(&infer_geometry_of));
  m.impl("storable_max", TORCH_BOX(&storable_max_of));
  m.impl("set_cuda_validation", TORCH_BOX(&set_cuda_validation_to));
  m.impl("cuda_validation", TORCH_BOX(&get_cuda_validation));
  m.impl("build_info", TORCH_BOX(&build_info));
}

// `import kvcomp._C` runs the registrations above; the module itself is empty.
PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
