/*
 * convsplit.h: the plain C API of the convsplit shim over libtorch.
 *
 * Every handle is opaque and owned by the caller, who releases it with the
 * matching *_free function. Calls that can fail return 0 on success and 1 on
 * failure; on failure *err receives a message allocated with malloc, which
 * the caller releases with cs_free. No C++ exception crosses this boundary.
 *
 * Functions that return lists or records return them as JSON text (also
 * released with cs_free), which keeps the boundary free of C++ types.
 */
#ifndef CONVSPLIT_H
#define CONVSPLIT_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct cs_module cs_module;
typedef struct cs_tensor cs_tensor;
typedef struct cs_builder cs_builder;

void cs_free(void* p);

/* Seeds libtorch's default CPU generator, as Python's torch.manual_seed does. */
void cs_manual_seed(uint64_t seed);

/* A copy of the default CPU generator, to undo the draws of a failed call. */
typedef struct cs_generator cs_generator;
int cs_generator_save(cs_generator** out, char** err);
int cs_generator_restore(cs_generator* saved, char** err);
void cs_generator_free(cs_generator* saved);

/* Modules. */
int cs_module_load(const char* path, cs_module** out, char** err);
int cs_module_save(cs_module* m, const char* path, char** err);
void cs_module_free(cs_module* m);
int cs_module_clone(cs_module* m, cs_module** out, char** err);
int cs_module_submodule(cs_module* m, const char* path, cs_module** out, char** err);
int cs_module_named_modules(cs_module* m, char** json, char** err);
int cs_module_method_names(cs_module* m, char** json, char** err);
int cs_module_state_dict(cs_module* m, char** json, char** err);
int cs_module_train(cs_module* m, int on, char** err);
int cs_module_is_training(cs_module* m, int* out, char** err);
int cs_module_same_object(cs_module* a, cs_module* b);
int cs_module_parameter(cs_module* m, const char* name, cs_tensor** out, char** err);
int cs_module_set_parameter(cs_module* m, const char* name, cs_tensor* t, char** err);
int cs_module_forward(cs_module* m, cs_tensor** inputs, int n_inputs,
                      cs_tensor*** outputs, int* n_outputs, char** err);

/* Conv2d introspection: geometry of the Conv2d module m as JSON. */
int cs_conv2d_geometry(cs_module* m, char** json, char** err);

/* cs_layer describes a module for planning a decomposition. Strings are
 * malloc'd (NULL when empty); cs_layer_free releases them. The geometry
 * fields are set for a Conv2d whose geometry could be read, and
 * geometry_error otherwise. methods lists the Conv2d's methods, each ended
 * by a newline. weight and bias (NULL when absent) are the caller's. */
typedef struct cs_layer {
  int found, conv2d;
  char *type, *class_name;
  int64_t in_channels, out_channels, groups;
  int64_t kernel_size[2], stride[2], padding[2], dilation[2];
  char *padding_mode, *padding_string, *dtype;
  int bias, scripted, channels_last, training;
  int64_t weight_shape[4];
  int weight_ndim;
  char *geometry_error, *methods;
  cs_tensor *weight, *bias_tensor;
} cs_layer;

/* Describes the module at path in one call. */
int cs_describe_layer(cs_module* root, const char* path, cs_layer* out, char** err);
void cs_layer_free(cs_layer* layer);

/*
 * Builders make new modules in the compilation unit of an existing module,
 * so that they can join its tree. A builder compiles each distinct layer
 * configuration once.
 */
int cs_builder_new(cs_module* owner, cs_builder** out, char** err);
void cs_builder_free(cs_builder* b);
/* cs_conv2d_spec describes a Conv2d for cs_builder_conv2d. */
typedef struct cs_conv2d_spec {
  int64_t in_channels, out_channels, groups;
  int64_t kernel_size[2], stride[2], padding[2], dilation[2];
  const char* padding_mode; /* zeros, reflect, replicate or circular */
  const char* padding_string; /* "same" or "valid" in place of padding; NULL or "" for none */
  int bias;                 /* nonzero: the layer has a bias */
  int dtype;                /* c10::ScalarType of the parameters */
  int channels_last;        /* nonzero: weight stored channels-last */
  int training;             /* the new module's training flag */
} cs_conv2d_spec;

/* Makes a Conv2d with default-initialized parameters, drawn as
 * torch.nn.Conv2d's constructor draws them. */
int cs_builder_conv2d(cs_builder* b, const cs_conv2d_spec* spec, cs_module** out, char** err);
/* Makes a Conv2d holding the given weight and bias (NULL: none). */
int cs_builder_conv2d_with(cs_builder* b, const cs_conv2d_spec* spec, cs_tensor* weight, cs_tensor* bias,
                           cs_module** out, char** err);
/* Allocates the parameters of a Conv2d, without values; *bias is NULL when
 * the spec has none. */
int cs_conv2d_parameters(const cs_conv2d_spec* spec, cs_tensor** weight, cs_tensor** bias, char** err);
/* Fills a Conv2d's weight, then its bias (may be NULL), from the default
 * generator as torch.nn.Conv2d's constructor does. It touches nothing else,
 * so it may run on one thread while a builder works on another. */
int cs_conv2d_draw(cs_tensor* weight, cs_tensor* bias, char** err);
/* aliases: names of extra methods (such as forward1) that run forward. */
int cs_builder_sequential(cs_builder* b, cs_module** children, int n_children,
                          const char** aliases, int n_aliases, int training,
                          cs_module** out, char** err);

/*
 * Replaces the submodules at the dotted paths with the given modules, all or
 * nothing: every check runs before anything changes.
 */
int cs_module_replace(cs_module* root, const char** paths, cs_module** replacements,
                      int n, char** err);
/* cs_module_replace in two steps: prepare runs every check and builds the
 * new types without changing the model, and commit changes it. Commit does
 * not repeat the checks, so the caller must not change the model in
 * between. Committing a plan a second time fails. */
typedef struct cs_replace_plan cs_replace_plan;
int cs_module_replace_prepare(cs_module* root, const char** paths, cs_module** replacements, int n,
                              cs_replace_plan** out, char** err);
int cs_replace_commit(cs_replace_plan* prepared, char** err);
void cs_replace_plan_free(cs_replace_plan* prepared);

/* Tensors. dtype codes are c10::ScalarType values. */
int cs_tensor_from_data(const void* data, int dtype, const int64_t* shape, int ndim,
                        cs_tensor** out, char** err);
void cs_tensor_free(cs_tensor* t);
int cs_tensor_dtype(cs_tensor* t);
int cs_tensor_ndim(cs_tensor* t);
void cs_tensor_shape(cs_tensor* t, int64_t* shape);
int cs_tensor_copy_data(cs_tensor* t, void* buf, size_t nbytes, char** err);
int cs_tensor_same(cs_tensor* a, cs_tensor* b);
int cs_tensor_channels_last(cs_tensor* t);
int cs_tensor_requires_grad(cs_tensor* t);

#ifdef __cplusplus
}
#endif

#endif
