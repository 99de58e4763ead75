// surgery.cpp: replacing submodules of a live TorchScript module.
//
// A TorchScript module's children are typed attributes of its class type,
// and its methods reach them through prim::GetAttr and call them through
// prim::CallMethod. Putting a Sequential where a Conv2d was therefore means
// changing the declared attribute types of every module between the root and
// the layer, and the output types of the GetAttr nodes that read them.
//
// The work runs in three phases so that a failure changes nothing:
//   1. check: paths, aliasing, and every use of each layer in the graphs;
//   2. build: new class types, objects and method graphs, out of the tree;
//   3. commit: attribute types, slots, the graphs of types changed in place
//      and the methods, none of which throws.
#include <torch/csrc/jit/api/function_impl.h>
#include <torch/csrc/jit/ir/ir.h>

#include <algorithm>
#include <set>
#include <unordered_map>
#include <unordered_set>

#include "internal.h"

using convsplit::guard;
using torch::jit::Block;
using torch::jit::Module;
using torch::jit::Node;
using torch::jit::Value;

namespace {

std::string displayPath(const std::string& path) { return path.empty() ? "<root>" : path; }

std::string join(const std::string& parent, const std::string& name) {
  return parent.empty() ? name : parent + "." + name;
}

std::string parentOf(const std::string& path) {
  size_t dot = path.rfind('.');
  return dot == std::string::npos ? "" : path.substr(0, dot);
}

std::string baseName(const std::string& path) {
  size_t dot = path.rfind('.');
  return dot == std::string::npos ? path : path.substr(dot + 1);
}

// A module between the root and a replaced layer: its type must change.
struct Change {
  std::string path;
  Module object;
  c10::ClassTypePtr oldType;
  // copy: the type is shared with another module of the tree, so this module
  // becomes a new object of a new type. Otherwise its type changes in place.
  bool copy = false;
  c10::ClassTypePtr newType;
  c10::intrusive_ptr<c10::ivalue::Object> newObject;
  std::map<std::string, c10::IValue> children;           // attribute -> new child
  std::map<std::string, c10::TypePtr> attributeTypes;    // attribute -> new declared type
  // New method graphs and schemas, in method order. A copied type gets its
  // functions while it is built; an in-place type gets them at commit.
  struct Method {
    std::string name;
    // qualifiedName is type.method for the new type; an in-place type's old
    // function has the same name.
    c10::QualifiedName qualifiedName;
    std::shared_ptr<torch::jit::Graph> graph;
    c10::FunctionSchema schema;
  };
  std::vector<Method> methods;
  size_t depth() const { return path.empty() ? 0 : convsplit::splitPath(path).size(); }
};

struct Plan {
  Module root;
  std::shared_ptr<torch::jit::CompilationUnit> cu;
  std::map<std::string, Module> replacements;  // layer path -> new module
  std::map<std::string, Change> changes;       // ancestor path -> change
  // The types of all changes after the commit, and those changed in place.
  std::unordered_set<const c10::ClassType*> changedTypes;
  std::unordered_map<const c10::ClassType*, const Change*> inPlace;
  // Names given to copied types, which join the compilation unit at commit.
  std::unordered_set<std::string> reservedNames;
};

// ---------------------------------------------------------------------------
// Phase 1: checks.

void checkPaths(Plan& plan, const std::vector<std::string>& paths) {
  std::set<std::string> seen;
  for (const auto& path : paths) {
    TORCH_CHECK(!path.empty(), "the root module cannot be replaced in place; use the new module instead");
    TORCH_CHECK(seen.insert(path).second, "layer '", path, "' is listed twice");
  }
  for (const auto& a : seen) {
    for (const auto& b : seen) {
      TORCH_CHECK(a == b || b.compare(0, a.size() + 1, a + ".") != 0, "layer '", b,
                  "' lies inside layer '", a, "', which is replaced too");
    }
  }
}

// ModuleCensus is what one walk over the module tree finds: the number of
// distinct module objects of each class type, and whether any object is
// reachable by more than one path.
struct ModuleCensus {
  std::unordered_map<const c10::ClassType*, int> instances;
  std::unordered_set<const c10::ivalue::Object*> objects;
  bool shared = false;
};

void countModules(const c10::ivalue::Object& object, ModuleCensus& census) {
  if (!census.objects.insert(&object).second) {
    census.shared = true;
    return;
  }
  const c10::ClassType& type = *object.type();
  census.instances[&type]++;
  for (size_t i = 0; i < type.numAttributes(); ++i) {
    const c10::IValue& child = object.getSlot(i);
    if (child.isObject() && child.toObjectRef().type()->is_module()) countModules(child.toObjectRef(), census);
  }
}

ModuleCensus takeCensus(const Module& root) {
  ModuleCensus census;
  countModules(*root._ivalue(), census);
  return census;
}

// checkOutsideTree rejects a replacement that contains a module of the
// model other than the replaced layer and its own submodules, such as the
// layer's parent: the tree would contain a cycle or one module twice.
// Wrapping the replaced layer itself is fine, since it leaves its place.
void checkOutsideTree(const ModuleCensus& census, const Module& root, const std::string& path,
                      const Module& replacement) {
  std::unordered_set<const c10::ivalue::Object*> moving;
  for (const auto& m : convsplit::findSubmodule(root, path).modules()) moving.insert(m._ivalue().get());
  for (const auto& item : replacement.named_modules()) {
    const auto* object = item.value._ivalue().get();
    TORCH_CHECK(!census.objects.count(object) || moving.count(object), "the replacement for layer '", path, "' ",
                item.name.empty() ? std::string("is") : "contains, as '" + item.name + "',",
                " a module of the model; build a new module instead");
  }
}

// checkAliasing rejects trees in which a changed module is reachable by two
// paths: replacing it under one name would silently change the other. It
// runs only when the census found such a module, since it builds every path.
void checkAliasing(const Plan& plan) {
  std::unordered_map<const c10::ivalue::Object*, std::string> firstPath;
  std::unordered_set<std::string> involved;
  for (const auto& r : plan.replacements) involved.insert(r.first);
  for (const auto& c : plan.changes) involved.insert(c.first);
  for (const auto& item : plan.root.named_modules()) {
    auto [it, inserted] = firstPath.emplace(item.value._ivalue().get(), item.name);
    if (!inserted && (involved.count(item.name) || involved.count(it->second))) {
      TORCH_CHECK(false, "module '", displayPath(item.name), "' is the same object as '", displayPath(it->second),
                  "'; replacing a layer reachable by two paths is not supported");
    }
  }
}

std::string describeUse(const torch::jit::Use& use) {
  Node* user = use.user;
  if (user->kind() == c10::prim::GetAttr) return "reads its attribute '" + user->s(c10::attr::name) + "'";
  if (user->kind() == c10::prim::SetAttr) return "writes its attribute '" + user->s(c10::attr::name) + "'";
  if (user->kind() == c10::prim::CallMethod && use.offset == 0) {
    return "calls its method '" + user->s(c10::attr::name) + "'";
  }
  return std::string("passes it to ") + user->kind().toQualString();
}

// replacementAccepts reports whether a use of a replaced layer still works when
// the replacement takes its place: only calls of methods the replacement
// has, with the same number of arguments.
bool replacementAccepts(const torch::jit::Use& use, const Module& replacement) {
  Node* user = use.user;
  if (user->kind() != c10::prim::CallMethod || use.offset != 0) return false;
  auto* method = replacement.type()->findMethod(user->s(c10::attr::name));
  return method != nullptr && method->getSchema().arguments().size() == user->inputs().size();
}

// checkUsesInBlock follows module values from self through GetAttr nodes and
// checks each use of a replaced layer or of a module whose type changes.
void checkUsesInBlock(const Plan& plan, Block* block, std::unordered_map<Value*, std::string>& paths,
                      const std::string& owner, const std::string& method) {
  for (Node* node : block->nodes()) {
    for (Block* sub : node->blocks()) checkUsesInBlock(plan, sub, paths, owner, method);
    if (node->kind() != c10::prim::GetAttr) continue;
    auto found = paths.find(node->input(0));
    if (found == paths.end()) continue;
    auto cls = node->output()->type()->cast<c10::ClassType>();
    if (!cls || !cls->is_module()) continue;

    const std::string path = join(found->second, node->s(c10::attr::name));
    paths[node->output()] = path;
    auto replaced = plan.replacements.find(path);
    if (replaced != plan.replacements.end()) {
      for (const auto& use : node->output()->uses()) {
        TORCH_CHECK(replacementAccepts(use, replaced->second), "layer '", path, "': method '", method,
                    "' of module '", displayPath(owner), "' ", describeUse(use),
                    ", which the replacement cannot keep");
      }
    } else if (plan.changes.count(path)) {
      for (const auto& use : node->output()->uses()) {
        Node* user = use.user;
        bool ok = use.offset == 0 && (user->kind() == c10::prim::GetAttr || user->kind() == c10::prim::CallMethod);
        TORCH_CHECK(ok, "module '", path, "', which contains a replaced layer: method '", method,
                    "' of module '", displayPath(owner), "' ", describeUse(use),
                    ", which a change of its type would break");
      }
    }
  }
}

void checkUses(const Plan& plan) {
  for (const auto& [path, change] : plan.changes) {
    auto type = change.oldType;
    TORCH_CHECK(type->getForwardHooks().empty() && type->getForwardPreHooks().empty(),
                "module '", displayPath(path), "' has forward hooks, which are not supported");
    TORCH_CHECK(type->properties().empty(), "module '", displayPath(path),
                "' has properties, which are not supported");
    for (auto* fn : type->methods()) {
      auto graph = torch::jit::toGraphFunction(*fn).graph();
      std::unordered_map<Value*, std::string> paths{{graph->inputs().at(0), path}};
      checkUsesInBlock(plan, graph->block(), paths, path, fn->name());
    }
  }
}

void checkReplacement(const Plan& plan, const std::string& path, const Module& replacement) {
  auto cu = replacement.type()->compilation_unit();
  TORCH_CHECK(cu.get() == plan.cu.get(), "the replacement for layer '", path,
              "' was built for another model; build it with a builder of this model");
  TORCH_CHECK(replacement._ivalue().get() != plan.root._ivalue().get(), "layer '", path,
              "' cannot be replaced by the root module");
}

// ---------------------------------------------------------------------------
// Phase 2: building the new types, objects and methods.

c10::TypePtr newAttributeType(const Change& change, const std::string& name, const c10::TypePtr& childType) {
  c10::TypePtr declared = change.oldType->getAttribute(name);
  if (declared->cast<c10::InterfaceType>()) {
    // Interface-typed attributes keep their type; the new child must still
    // provide the interface's methods.
    TORCH_CHECK(childType->isSubtypeOf(*declared), "the new child '", join(change.path, name),
                "' does not implement the interface ", declared->repr_str());
    return declared;
  }
  TORCH_CHECK(declared->cast<c10::ClassType>(), "attribute '", join(change.path, name), "' is declared as ",
              declared->repr_str(), ", not as a module type");
  return childType;
}

// freshName returns the first name of the form a.b.___torch_mangle_N.Class
// that no type or function of the compilation unit or of the plan has.
// CompilationUnit::mangle would also find one, but it advances a counter, so
// a plan that is never committed would change the names of later types.
//
//   __torch__.torchvision.models.resnet.BasicBlock
//     -> __torch__.torchvision.models.resnet.___torch_mangle_0.BasicBlock
//   __torch__.m.___torch_mangle_7.Block -> __torch__.m.___torch_mangle_0.Block
c10::QualifiedName freshName(Plan& plan, const c10::QualifiedName& name) {
  static const std::string prefix = "___torch_mangle_";
  std::vector<std::string> atoms = name.atoms();
  auto mangled = std::find_if(atoms.begin(), atoms.end(),
                              [](const std::string& atom) { return atom.rfind(prefix, 0) == 0; });
  if (mangled == atoms.end()) mangled = atoms.insert(atoms.end() - 1, prefix);
  for (size_t n = 0;; ++n) {
    *mangled = prefix + std::to_string(n);
    c10::QualifiedName candidate(atoms);
    if (!plan.cu->get_type(candidate) && !plan.cu->find_function(candidate) &&
        plan.reservedNames.insert(candidate.qualifiedName()).second) {
      return candidate;
    }
  }
}

void buildCopy(Plan& plan, Change& change) {
  auto name = freshName(plan, *change.oldType->name());
  change.newType = c10::ClassType::create(name, plan.cu, /*is_module=*/true);
  const auto& old = change.oldType;
  for (size_t i = 0; i < old->numAttributes(); ++i) {
    const std::string attr = old->getAttributeName(i);
    auto changed = change.attributeTypes.find(attr);
    c10::TypePtr type = changed != change.attributeTypes.end() ? changed->second : old->getAttribute(i);
    change.newType->addAttribute(attr, type, old->is_parameter(i), old->is_buffer(i));
  }
  for (size_t i = 0; i < old->numConstants(); ++i) {
    change.newType->addConstant(old->getConstantName(i), old->getConstant(i));
  }
  change.newObject = c10::ivalue::Object::create(c10::StrongTypePtr(plan.cu, change.newType), old->numAttributes());
  for (size_t i = 0; i < old->numAttributes(); ++i) {
    change.newObject->setSlot(i, change.object._ivalue()->getSlot(i));
  }
  for (const auto& [attr, child] : change.children) {
    change.newObject->setSlot(*change.newType->findAttributeSlot(attr), child);
  }
}

// buildObjects decides, bottom-up, which modules get a copied type and
// records the new children and attribute types of every change.
void buildObjects(Plan& plan, ModuleCensus& census) {
  auto& counts = census.instances;
  std::vector<Change*> order;
  for (auto& entry : plan.changes) order.push_back(&entry.second);
  std::sort(order.begin(), order.end(), [](Change* a, Change* b) { return a->depth() > b->depth(); });

  for (Change* change : order) {
    for (const auto& [path, replacement] : plan.replacements) {
      if (parentOf(path) != change->path) continue;
      const std::string attr = baseName(path);
      change->children[attr] = replacement._ivalue();
      change->attributeTypes[attr] = newAttributeType(*change, attr, replacement.type());
    }
    for (auto& [path, child] : plan.changes) {
      if (path.empty() || parentOf(path) != change->path) continue;
      const std::string attr = baseName(path);
      change->children[attr] = child.newObject;
      change->attributeTypes[attr] = newAttributeType(*change, attr, child.newType);
    }

    int& count = counts[change->oldType.get()];
    change->copy = !change->path.empty() && count > 1;
    if (change->copy) {
      count--;
      buildCopy(plan, *change);
    } else {
      change->newType = change->oldType;
      change->newObject = change->object._ivalue();
    }
  }
}

// futureAttributeType is the declared type an attribute will have once the
// changes are committed.
c10::TypePtr futureAttributeType(const Plan& plan, const c10::ClassTypePtr& cls, const std::string& name,
                                 const std::unordered_map<const c10::ClassType*, const Change*>& inPlace) {
  auto found = inPlace.find(cls.get());
  if (found != inPlace.end()) {
    auto attr = found->second->attributeTypes.find(name);
    if (attr != found->second->attributeTypes.end()) return attr->second;
  }
  return cls->getAttribute(name);
}

// retypeBlock gives each GetAttr that reads from a changed or new type the
// attribute's future type. Nodes come in topological order, so a chain such
// as self.blocks then getattr(blocks, "0") is retyped link by link.
void retypeBlock(const Plan& plan, Block* block, const std::unordered_set<const c10::ClassType*>& changedTypes,
                 const std::unordered_map<const c10::ClassType*, const Change*>& inPlace) {
  for (Node* node : block->nodes()) {
    for (Block* sub : node->blocks()) retypeBlock(plan, sub, changedTypes, inPlace);
    if (node->kind() != c10::prim::GetAttr) continue;
    auto cls = node->input(0)->type()->cast<c10::ClassType>();
    if (!cls || !changedTypes.count(cls.get())) continue;
    node->output()->setType(futureAttributeType(plan, cls, node->s(c10::attr::name), inPlace));
  }
}

void installMethod(Plan& plan, const c10::ClassTypePtr& type, const Change::Method& method) {
  auto* fn = plan.cu->create_function(method.qualifiedName, method.graph);
  fn->setSchema(method.schema);
  type->addMethod(fn);
}

// buildMethods prepares a fresh function for every method of every changed
// type, because a method that already ran keeps a plan compiled for the old
// types. Copied types get retyped graph copies now. Types changed in place
// keep their graphs, which commit retypes after every copy is taken.
void buildMethods(Plan& plan) {
  for (const auto& [path, change] : plan.changes) {
    plan.changedTypes.insert(change.newType.get());
    if (!change.copy) plan.inPlace[change.newType.get()] = &change;
  }

  for (auto& [path, change] : plan.changes) {
    for (auto* fn : change.oldType->methods()) {
      auto graph = torch::jit::toGraphFunction(*fn).graph();
      c10::FunctionSchema schema = fn->getSchema();
      if (change.copy) {
        graph = graph->copy();
        auto oldType = change.oldType;
        auto newType = change.newType;
        graph->remapTypes([&](c10::TypePtr t) -> c10::TypePtr { return t == oldType ? newType : t; });
        auto arguments = schema.arguments();
        arguments.at(0) = arguments.at(0).cloneWithType(newType);
        schema = schema.cloneWithArguments(arguments);
        retypeBlock(plan, graph->block(), plan.changedTypes, plan.inPlace);
      }
      c10::QualifiedName qualifiedName(*change.newType->name(), fn->name());
      change.methods.push_back({fn->name(), std::move(qualifiedName), graph, schema});
    }
  }
}

// ---------------------------------------------------------------------------
// Phase 3: commit.

void commit(Plan& plan) {
  // Copied types join the compilation unit only now, so that a plan that is
  // never committed leaves nothing behind. Their names are fresh mangles.
  for (auto& [path, change] : plan.changes) {
    if (!change.copy) continue;
    plan.cu->register_type(change.newType);
    for (const auto& method : change.methods) installMethod(plan, change.newType, method);
  }

  for (auto& [path, change] : plan.changes) {
    if (change.copy) continue;
    for (const auto& [attr, type] : change.attributeTypes) {
      if (!change.oldType->getAttribute(attr)->cast<c10::InterfaceType>()) {
        change.oldType->unsafeChangeAttributeType(attr, type);
      }
    }
    for (const auto& [attr, child] : change.children) {
      change.object._ivalue()->setSlot(*change.oldType->findAttributeSlot(attr), child);
    }
    // The serializer requires a method's function to carry the qualified
    // name type.method, so the old functions leave the compilation unit
    // before the new ones take their names. Every caller of an old function
    // is a method of a changed type, so no execution plan keeps using one.
    // Removing all methods first keeps their order.
    for (const auto& method : change.methods) {
      change.oldType->unsafeRemoveMethod(method.name);
      plan.cu->unsafeRemoveMethod(method.qualifiedName);
    }
    for (const auto& method : change.methods) {
      retypeBlock(plan, method.graph->block(), plan.changedTypes, plan.inPlace);
      installMethod(plan, change.oldType, method);
    }
  }
}

// prepare runs the checks and builds everything the change needs, leaving
// the tree as it is; commit then applies the plan.
void prepare(Plan& plan, const Module& root, const std::vector<std::string>& paths,
             const std::vector<Module>& modules) {
  plan.root = root;
  plan.cu = root._ivalue()->compilation_unit();
  checkPaths(plan, paths);

  for (size_t i = 0; i < paths.size(); ++i) {
    convsplit::findSubmodule(root, paths[i]);  // the layer must exist
    checkReplacement(plan, paths[i], modules[i]);
    plan.replacements.emplace(paths[i], modules[i]);
    for (std::string p = parentOf(paths[i]);; p = parentOf(p)) {
      if (!plan.changes.count(p)) {
        Change change;
        change.path = p;
        change.object = convsplit::findSubmodule(root, p);
        change.oldType = change.object.type();
        plan.changes.emplace(p, change);
      }
      if (p.empty()) break;
    }
  }
  ModuleCensus census = takeCensus(root);
  for (size_t i = 0; i < paths.size(); ++i) checkOutsideTree(census, root, paths[i], modules[i]);
  if (census.shared) checkAliasing(plan);
  checkUses(plan);

  buildObjects(plan, census);
  buildMethods(plan);
}

void prepareFromC(Plan& plan, cs_module* root, const char** paths, cs_module** replacements, int n) {
  // A submodule's parents may call it through methods compiled for its
  // current type, which this handle cannot reach to rewrite.
  TORCH_CHECK(!root->submodule,
              "replace works on a model's root handle, not on a submodule; pass the full dotted paths to the model");
  std::vector<std::string> names;
  std::vector<Module> modules;
  for (int i = 0; i < n; ++i) {
    names.emplace_back(paths[i]);
    modules.push_back(replacements[i]->module);
  }
  prepare(plan, root->module, names, modules);
}

}  // namespace

// cs_replace_plan is a replacement whose checks have passed and whose types
// are built, waiting to be committed.
struct cs_replace_plan {
  Plan plan;
  bool committed = false;
};

extern "C" {

int cs_module_replace(cs_module* root, const char** paths, cs_module** replacements, int n, char** err) {
  return guard(err, [&] {
    Plan plan;
    prepareFromC(plan, root, paths, replacements, n);
    commit(plan);
  });
}

int cs_module_replace_prepare(cs_module* root, const char** paths, cs_module** replacements, int n,
                              cs_replace_plan** out, char** err) {
  return guard(err, [&] {
    auto prepared = std::make_unique<cs_replace_plan>();
    prepareFromC(prepared->plan, root, paths, replacements, n);
    *out = prepared.release();
  });
}

int cs_replace_commit(cs_replace_plan* prepared, char** err) {
  return guard(err, [&] {
    TORCH_CHECK(!prepared->committed, "the replacement is already committed");
    prepared->committed = true;
    commit(prepared->plan);
  });
}

void cs_replace_plan_free(cs_replace_plan* prepared) { delete prepared; }

}  // extern "C"
