// state.cpp: state dicts of TorchScript modules, loading values into them,
// and writing torch.save archives.
#include <caffe2/serialize/inline_container.h>
#include <torch/torch.h>

#include <fstream>
#include <unordered_map>
#include <unordered_set>

#include "internal.h"
#include "state.h"

using convsplit::guard;
using convsplit::JsonWriter;
using torch::jit::Module;

namespace {

struct StateItem {
  std::string key;
  at::Tensor tensor;
};

// collectState lists a module's parameters and buffers in the order of
// Python's state_dict(): a module's own entries first, then each child's.
// Parameters set to None (an absent bias) are not listed.
void collectState(const Module& m, const std::string& prefix, std::vector<StateItem>& out) {
  auto type = m.type();
  for (size_t i = 0; i < type->numAttributes(); ++i) {
    if (!type->is_parameter(i) && !type->is_buffer(i)) continue;
    c10::IValue v = m._ivalue()->getSlot(i);
    if (!v.isTensor()) continue;
    out.push_back({prefix + type->getAttributeName(i), v.toTensor()});
  }
  for (const auto& child : m.named_children()) {
    collectState(child.value, prefix + child.name + ".", out);
  }
}

cs_tensor** allocHandles(size_t n) {
  auto** handles = static_cast<cs_tensor**>(std::malloc(sizeof(cs_tensor*) * std::max<size_t>(1, n)));
  TORCH_CHECK(handles != nullptr, "out of memory");
  return handles;
}

const void* storageKey(const at::Tensor& t) { return t.storage().unsafeGetStorageImpl(); }

}  // namespace

extern "C" {

int cs_module_state_tensors(cs_module* m, char** names, cs_tensor*** tensors, int* n, char** err) {
  return guard(err, [&] {
    std::vector<StateItem> items;
    collectState(m->module, "", items);
    JsonWriter w;
    w.beginArray();
    for (const auto& item : items) w.value(item.key);
    w.endArray();
    cs_tensor** handles = allocHandles(items.size());
    for (size_t i = 0; i < items.size(); ++i) handles[i] = new cs_tensor{items[i].tensor.detach()};
    *names = convsplit::copyString(w.str());
    *tensors = handles;
    *n = static_cast<int>(items.size());
  });
}

int cs_module_load_state(cs_module* m, const char** keys, cs_tensor** values, int n, int strict,
                         char** report, char** err) {
  return guard(err, [&] {
    std::vector<StateItem> targets;
    collectState(m->module, "", targets);
    std::unordered_map<std::string, size_t> index;
    for (size_t i = 0; i < targets.size(); ++i) index.emplace(targets[i].key, i);

    std::vector<bool> given(targets.size(), false);
    std::vector<std::pair<at::Tensor, at::Tensor>> copies;  // (target, source)
    std::vector<std::string> loaded, unexpected;
    std::vector<std::pair<at::Tensor, at::Tensor>> mismatches;  // (target, source)
    std::vector<std::string> mismatchedKeys;
    bool problems = false;
    for (int i = 0; i < n; ++i) {
      std::string key = keys[i];
      auto it = index.find(key);
      if (it == index.end()) {
        unexpected.push_back(key);
        problems = true;
        continue;
      }
      given[it->second] = true;
      const at::Tensor& target = targets[it->second].tensor;
      const at::Tensor& source = values[i]->tensor;
      if (target.sizes() != source.sizes() || target.scalar_type() != source.scalar_type()) {
        mismatchedKeys.push_back(key);
        mismatches.emplace_back(target, source);
        problems = true;
        continue;
      }
      loaded.push_back(key);
      copies.emplace_back(target, source);
    }
    std::vector<std::string> missing;
    for (size_t i = 0; i < targets.size(); ++i) {
      if (!given[i]) {
        missing.push_back(targets[i].key);
        problems = true;
      }
    }

    bool copy = !(strict && problems);
    if (copy) {
      // A source that shares storage with a target (such as the module's own
      // state dict) is cloned first, so that no copy reads a value an earlier
      // copy has already overwritten.
      std::unordered_set<const void*> targetStorages;
      for (const auto& t : targets) targetStorages.insert(storageKey(t.tensor));
      for (auto& c : copies) {
        if (targetStorages.count(storageKey(c.second)) && !c.first.is_same(c.second)) {
          c.second = c.second.clone();
        }
      }
      torch::NoGradGuard no_grad;
      for (auto& c : copies) c.first.copy_(c.second);
    } else {
      loaded.clear();
    }

    JsonWriter w;
    auto writeList = [&](const char* name, const std::vector<std::string>& list) {
      w.key(name).beginArray();
      for (const auto& s : list) w.value(s);
      w.endArray();
    };
    w.beginObject();
    writeList("loaded", loaded);
    writeList("missing", missing);
    writeList("unexpected", unexpected);
    w.key("mismatched").beginArray();
    for (size_t i = 0; i < mismatches.size(); ++i) {
      const at::Tensor& target = mismatches[i].first;
      const at::Tensor& source = mismatches[i].second;
      w.beginObject().key("key").value(mismatchedKeys[i]);
      w.key("expected_shape").ints(target.sizes().vec());
      w.key("expected_dtype").value(static_cast<int64_t>(target.scalar_type()));
      w.key("shape").ints(source.sizes().vec());
      w.key("dtype").value(static_cast<int64_t>(source.scalar_type()));
      w.endObject();
    }
    w.endArray().endObject();
    *report = convsplit::copyString(w.str());
  });
}

int cs_tensor_as_strided(cs_tensor* base, const int64_t* sizes, const int64_t* strides, int ndim,
                         int64_t offset, cs_tensor** out, char** err) {
  return guard(err, [&] {
    std::vector<int64_t> size(sizes, sizes + ndim), stride(strides, strides + ndim);
    for (int i = 0; i < ndim; ++i) {
      TORCH_CHECK(size[i] >= 0 && stride[i] >= 0, "invalid size ", size[i], " or stride ", stride[i],
                  " in dimension ", i);
    }
    TORCH_CHECK(offset >= 0, "invalid storage offset ", offset);
    *out = new cs_tensor{base->tensor.as_strided(size, stride, offset)};
  });
}

int cs_tensor_storage_info(cs_tensor* t, uint64_t* storage, int64_t* storage_bytes, int64_t* offset,
                           int64_t* strides, char** err) {
  return guard(err, [&] {
    const at::Tensor& x = t->tensor;
    TORCH_CHECK(x.has_storage(), "tensor has no storage");
    *storage = reinterpret_cast<uint64_t>(storageKey(x));
    *storage_bytes = static_cast<int64_t>(x.storage().nbytes());
    *offset = x.storage_offset();
    for (int64_t i = 0; i < x.dim(); ++i) strides[i] = x.stride(i);
  });
}

int cs_write_torch_archive(const char* path, const void* pickle, size_t pickle_size,
                           cs_tensor** storages, int n, char** err) {
  return guard(err, [&] {
    std::ofstream file(path, std::ios::binary | std::ios::trunc);
    TORCH_CHECK(file, "cannot open '", path, "' for writing");
    // With a writer function the records sit under "archive/", as Python's
    // torch.save names them when given a file object.
    caffe2::serialize::PyTorchStreamWriter writer([&](const void* data, size_t size) -> size_t {
      file.write(static_cast<const char*>(data), static_cast<std::streamsize>(size));
      return file ? size : 0;
    });
    writer.writeRecord("data.pkl", pickle, pickle_size);
    for (int i = 0; i < n; ++i) {
      const at::Tensor& t = storages[i]->tensor;
      TORCH_CHECK(t.device().is_cpu(), "storage ", i, " is on ", t.device(), ", not the CPU");
      const c10::Storage& s = t.storage();
      writer.writeRecord("data/" + std::to_string(i), s.data(), s.nbytes());
    }
    writer.writeEndOfFile();
    file.close();
    TORCH_CHECK(file.good(), "writing '", path, "' failed");
  });
}

}  // extern "C"
