// internal.h: what the shim's translation units share: the handle structs,
// the exception guard of the C boundary and a small JSON writer.
#pragma once

#include <torch/script.h>

#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "convsplit.h"

struct cs_module {
  torch::jit::Module module;
  // Extra files of the archive the module was loaded from, written back on save.
  std::shared_ptr<torch::jit::ExtraFilesMap> extra_files;
  // submodule: the handle came from cs_module_submodule, so the object has
  // parents whose methods this handle cannot see.
  bool submodule = false;
};

struct cs_tensor {
  at::Tensor tensor;
};

namespace convsplit {

char* copyString(const std::string& s);

// cleanMessage turns a libtorch exception message into one a user can read:
// C++ backtraces and TorchScript interpreter tracebacks are dropped.
std::string cleanMessage(const std::string& message);

// guard runs body and turns every exception into a message in *err, so that
// none crosses the C boundary (a C++ exception reaching cgo aborts the process).
template <class Body>
int guard(char** err, Body&& body) {
  try {
    body();
    return 0;
  } catch (const c10::Error& e) {
    if (err) *err = copyString(cleanMessage(e.what_without_backtrace()));
  } catch (const std::exception& e) {
    if (err) *err = copyString(cleanMessage(e.what()));
  } catch (...) {
    if (err) *err = copyString("unknown C++ exception");
  }
  return 1;
}

// Module helpers shared by the translation units.
std::vector<std::string> splitPath(const std::string& path);
torch::jit::Module findSubmodule(const torch::jit::Module& root, const std::string& path);
std::string unmangledName(const c10::ClassTypePtr& type);
bool isConv2dType(const c10::ClassTypePtr& type);
void flattenOutputs(const c10::IValue& v, std::vector<at::Tensor>& out);

// JsonWriter appends JSON values to a string. It supports only the values
// the shim writes.
class JsonWriter {
 public:
  JsonWriter& beginObject();
  JsonWriter& endObject();
  JsonWriter& beginArray();
  JsonWriter& endArray();
  JsonWriter& key(const std::string& k);
  JsonWriter& value(const std::string& s);
  JsonWriter& value(const char* s) { return value(std::string(s)); }
  JsonWriter& value(int64_t v);
  JsonWriter& value(bool v);
  JsonWriter& ints(const std::vector<int64_t>& v);
  const std::string& str() const { return out_; }

 private:
  void separate();
  std::string out_;
  bool needComma_ = false;
};

// Geometry of a Conv2d layer as the C API exchanges it.
struct ConvGeometry {
  int64_t in_channels = 0, out_channels = 0, groups = 1;
  std::vector<int64_t> kernel_size{0, 0}, stride{1, 1}, padding{0, 0}, dilation{1, 1};
  std::string padding_mode = "zeros";
  // "same" or "valid" when the layer was built with a padding string.
  std::string padding_string;
  bool bias = false;
  bool scripted = true;
  bool channels_last = false;
  bool training = true;
  c10::ScalarType dtype = c10::kFloat;
  std::vector<int64_t> weight_shape;
};

void writeGeometry(JsonWriter& w, const ConvGeometry& g);

}  // namespace convsplit
