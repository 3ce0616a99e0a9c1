/*
 * cuda_info.cu -- which CUDA this build of gmpo_ext was compiled with, and what
 * the machine's runtime and driver provide, so that the Python layer can refuse
 * a mismatch with a clear message at the first CUDA call instead of letting the
 * first kernel launch fail with cudaErrorInsufficientDriver.
 *
 * The CUDA runtime is linked statically (setup.py), so the runtime version is
 * the toolkit's; a CUDA 13 build needs a driver that supports CUDA 13 (R580 or
 * newer), whatever CUDA the installed torch was built for.
 */
#include "../gmpo.h"
#include "launch.cuh"

extern "C" gmpo_status gmpo_cuda_versions(int *built, int *runtime, int *driver) {
#ifdef GMPO_SIMT
    // the SIMT emulation (tests): no CUDA toolkit, runtime or driver involved
    *built = *runtime = *driver = 0;
#else
    *built = CUDART_VERSION;
    *runtime = *driver = 0;
    if (cudaRuntimeGetVersion(runtime) != cudaSuccess) *runtime = 0;
    // 0 when no driver is installed (cudaDriverGetVersion does not fail then)
    if (cudaDriverGetVersion(driver) != cudaSuccess) *driver = 0;
    (void)cudaGetLastError();   // leave no sticky error for the next launch check
#endif
    return GMPO_OK;
}
