/*
 * Stand-ins for the TensorRT native libraries, so that the real Python bindings
 * (tensorrt-cu12-bindings, whose tensorrt.so needs libnvinfer.so.N, libnvinfer_plugin.so.N and
 * libnvonnxparser.so.N, N = the TensorRT major) can be imported where those libraries cannot be
 * had. The bindings' compiled module calls only these C entry points of the three libraries
 * (`nm -D --undefined-only tensorrt.so`, identical in 10.0.1, 10.16.1.11 and 11.4.0.106). Each
 * factory returns null and each query 0, as TensorRT does when it cannot start, so nothing is
 * built or run: a Python call that reaches TensorRT raises, as on a machine without a GPU.
 *
 * tests/test_trt_api_surface.py compiles this file three times, once per library:
 *   cc -shared -fPIC -DSTANDIN_NVINFER -Wl,-soname,libnvinfer.so.N -o libnvinfer.so.N standin.c
 * with STANDIN_NVINFER_PLUGIN and STANDIN_NVONNXPARSER for the other two.
 */
#include <stddef.h>

#ifdef STANDIN_NVINFER
void *createInferBuilder_INTERNAL(void *logger, int version) { return NULL; }
void *createInferRuntime_INTERNAL(void *logger, int version) { return NULL; }
void *createInferRefitter_INTERNAL(void *engine, void *logger, int version) { return NULL; }
void *getPluginRegistry(void) { return NULL; }
void *getBuilderPluginRegistry(int capability) { return NULL; }
#endif

#ifdef STANDIN_NVINFER_PLUGIN
int initLibNvInferPlugins(void *logger, const char *namespace_) { return 0; }
#endif

#ifdef STANDIN_NVONNXPARSER
void *createNvOnnxParser_INTERNAL(void *network, void *logger, int version) { return NULL; }
void *createNvOnnxParserRefitter_INTERNAL(void *refitter, void *logger, int version) { return NULL; }
int getNvOnnxParserVersion(void) { return 0; }
#endif
