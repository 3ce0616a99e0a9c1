// Driver of the SIMT harness self-test: runs one case per process, chosen by
// argv[1], so that a sanitizer report (which aborts) belongs to that case.
//
//   simt_selftest CASE [ARGS...]
//
// Prints "RESULT <case>: ..." and exits 0 when the kernel gave the CPU's
// answer with no error, 1 on a wrong answer, 2 when the launch reported an
// error (the message follows), 64 on bad usage. `all` runs every correct case
// and every in-process error case (expecting each error) and exits 0 only if
// everything behaved; `bench` times the block-sum kernel.

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>
#include <thread>
#include <vector>

#include "selftest.h"

#if defined(__SANITIZE_ADDRESS__)
static const bool kAsan = true;
#else
static const bool kAsan = false;
#endif

enum { OK = 0, WRONG = 1, ERROR = 2, USAGE = 64 };

static int report(const char* name, int code, const std::string& wrong) {
  if (code) {
    printf("RESULT %s: error %s: %s\n", name, st_error_name(code), st_error_string(code));
    return ERROR;
  }
  if (!wrong.empty()) {
    printf("RESULT %s: wrong result: %s\n", name, wrong.c_str());
    return WRONG;
  }
  printf("RESULT %s: ok\n", name);
  return OK;
}

static long arg(int argc, char** argv, int i, long dflt) { return argc > i ? strtol(argv[i], nullptr, 10) : dflt; }

// ----------------------------------------------------------------------------
// block sum (and its variant without the first barrier)

static int run_block_sum(const char* name, long rows, long n, int threads, int first_barrier) {
  std::vector<float> x(rows * n), sums(rows), centered(rows * n);
  for (long r = 0; r < rows; ++r)
    for (long i = 0; i < n; ++i) x[r * n + i] = static_cast<float>((r * 131 + i * 7 + i * i % 5) % 17 - 8 + r % 3);
  int code = st_block_sum(x.data(), sums.data(), centered.data(), rows, n, threads, first_barrier);
  std::string wrong;
  for (long r = 0; r < rows && wrong.empty(); ++r) {
    double s = 0;
    for (long i = 0; i < n; ++i) s += x[r * n + i];
    if (sums[r] != static_cast<float>(s)) {
      wrong = "row " + std::to_string(r) + ": sum " + std::to_string(sums[r]) + ", expected " + std::to_string(s);
      break;
    }
    const double mean = s / n;
    for (long i = 0; i < n; ++i)
      if (std::fabs(centered[r * n + i] - (x[r * n + i] - mean)) > 1e-4) {
        wrong = "row " + std::to_string(r) + ": centered value " + std::to_string(i) + " is off";
        break;
      }
  }
  return report(name, code, wrong);
}

// ----------------------------------------------------------------------------
// histogram (and its variant with too little dynamic shared memory)

static int run_histogram(const char* name, long n, int nbins, int blocks, int threads, int smem_bins) {
  std::vector<int> keys(n);
  unsigned state = 12345u;
  for (long i = 0; i < n; ++i) {
    state = state * 1664525u + 1013904223u;
    keys[i] = static_cast<int>((state >> 8) % 1000u);
  }
  std::vector<unsigned> hist(nbins, 0);
  float fsum = 0.0f;
  double dsum = 0.0;
  int kmax = -1;
  unsigned long long count = 0;
  int code = st_histogram(keys.data(), n, nbins, hist.data(), &fsum, &dsum, &kmax, &count, blocks, threads, smem_bins);
  std::vector<unsigned> ref(nbins, 0);
  double rf = 0, rd = 0;
  int rmax = -1;
  for (long i = 0; i < n; ++i) {
    ref[keys[i] % nbins]++;
    rf += keys[i] % 8;
    rd += 0.5 * keys[i];
    rmax = keys[i] > rmax ? keys[i] : rmax;
  }
  std::string wrong;
  if (hist != ref) wrong = "histogram differs";
  if (fsum != static_cast<float>(rf)) wrong += " float atomic sum differs";
  if (dsum != rd) wrong += " double atomic sum differs";
  if (kmax != rmax) wrong += " atomicMax differs";
  if (count != static_cast<unsigned long long>(n)) wrong += " count differs";
  return report(name, code, wrong);
}

// ----------------------------------------------------------------------------
// warp primitives against CUDA's documented semantics

static int run_warp_semantics() {
  std::vector<int> out(64 * ST_WARP_OUTS, 0);
  int code = st_warp_semantics(out.data());
  std::string wrong;
  for (int t = 0; t < 64 && wrong.empty(); ++t) {
    const int lane = t % 32, base = t - lane;
    const int expect[ST_WARP_OUTS] = {
        (base + (lane + 3) % 32) * 10,
        lane % 16 >= 3 ? t - 3 : t,
        lane % 8 + 5 < 8 ? t + 5 : t,
        t ^ 1,
        (lane & 8) ? t - 8 : t,
        t ^ 16,
        static_cast<int>(0x49249249u),
        t < 32 ? 1 : 2,
        13,
        3,
        -1,
        lane < 16 ? (t ^ 1) : -1,
        496,
        15,
        lane == 0 ? t : t - 1,
        507,
    };
    for (int k = 0; k < ST_WARP_OUTS; ++k)
      if (out[t * ST_WARP_OUTS + k] != expect[k]) {
        wrong = "thread " + std::to_string(t) + " output " + std::to_string(k) + ": got " +
                std::to_string(out[t * ST_WARP_OUTS + k]) + ", expected " + std::to_string(expect[k]);
        break;
      }
  }
  return report("warp_semantics", code, wrong);
}

// ----------------------------------------------------------------------------
// launches refused like CUDA refuses them

static int run_bad_launch() {
  const int expect[6] = {9, 9, 9, 1, 1, 0};  // invalid configuration x3, invalid argument x2, success
  std::string wrong;
  for (int which = 0; which < 6; ++which) {
    int code = st_bad_launch(which);
    if (code != expect[which])
      wrong += "case " + std::to_string(which) + " gave " + std::to_string(code) + " (" + st_error_string(code) +
               "), expected " + std::to_string(expect[which]) + "; ";
  }
  return report("bad_launch", 0, wrong);
}

// ----------------------------------------------------------------------------
// broken kernels

static int run_oob_read() {
  const int n = 1000;
  float* x = static_cast<float*>(malloc(n * sizeof(float)));  // exactly n: x[n] is past the end
  for (int i = 0; i < n; ++i) x[i] = 1.0f;
  float out = 0.0f;
  int code = st_oob_read_sum(x, n, &out);
  free(x);
  return report("oob_read", code, out == static_cast<float>(n) ? "" : "sum " + std::to_string(out));
}

static int run_simple(const char* name, int (*fn)(float*), int nout) {
  std::vector<float> out(nout, 0.0f);
  return report(name, fn(out.data()), "");
}

static int run_divergent(int threads) {
  std::vector<float> out(2 * threads, 0.0f);
  return report("divergent", st_divergent_barrier(out.data(), threads), "");
}

static int run_partial_warp(int threads) {
  std::vector<float> out(threads, 0.0f);
  return report("partial_warp", st_partial_warp_mask(out.data(), threads), "");
}

static int run_assert() {
  std::vector<float> x(100, 4.0f), out(100, 0.0f);
  x[37] = -1.0f;
  return report("assert", st_assert(x.data(), out.data(), 100), "");
}

static int run_smem_uninit() {
  std::vector<float> out(4, -1.0f);
  int code = st_smem_uninit(out.data());
  std::string wrong;
  if (out[0] != 8.0f || out[1] != 4.0f)  // block 1 wrote 4 slots of 1.0 and read 8
    wrong = "block sums " + std::to_string(out[0]) + ", " + std::to_string(out[1]) + " (expected 8, 4)";
  return report("smem_uninit", code, wrong);
}

static int run_misaligned(int use_ldg) {
  float* x = nullptr;
  if (posix_memalign(reinterpret_cast<void**>(&x), 16, (4 * 32 + 4) * sizeof(float)) != 0) return USAGE;
  for (int i = 0; i < 4 * 32 + 4; ++i) x[i] = 1.0f;
  std::vector<float> out(32, 0.0f);
  int code = st_misaligned(x, out.data(), use_ldg);
  free(x);
  return report(use_ldg ? "misaligned_ldg" : "misaligned", code, "");
}

static int run_concurrent() {
  // Two host threads launch at the same time, as pytest + PyTorch may.
  int results[2] = {-1, -1};
  auto body = [&](int id) {
    int rc = OK;
    for (int k = 0; k < 4 && rc == OK; ++k) rc = run_block_sum(id ? "concurrent/1" : "concurrent/0", 6 + id, 500 + 37 * k, 64 * (1 + id), 1);
    results[id] = rc;
  };
  std::thread a(body, 0), b(body, 1);
  a.join();
  b.join();
  return results[0] == OK && results[1] == OK ? OK : WRONG;
}

static int run_bench(long blocks, int threads, long n, int iters) {
  std::vector<float> x(blocks * n), sums(blocks), centered(blocks * n);
  for (long i = 0; i < blocks * n; ++i) x[i] = static_cast<float>(i % 13);
  for (int k = 0; k < 2; ++k) st_block_sum(x.data(), sums.data(), centered.data(), blocks, n, threads, 1);
  std::vector<double> ms;
  int code = 0;
  for (int k = 0; k < iters && !code; ++k) {
    auto t0 = std::chrono::steady_clock::now();
    code = st_block_sum(x.data(), sums.data(), centered.data(), blocks, n, threads, 1);
    ms.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
  }
  std::sort(ms.begin(), ms.end());
  const char* workers = getenv("SIMT_WORKERS");
  printf("BENCH block_sum %ld blocks x %d threads, %ld floats per block, %d launches: %.2f ms min, %.2f ms median "
         "per launch (SIMT_WORKERS=%s)\n",
         blocks, threads, n, iters, ms.front(), ms[ms.size() / 2], workers ? workers : "2 (default)");
  return report("bench", code, "");
}

// ----------------------------------------------------------------------------
// everything that can run in one process

// small: sizes for TSan, which slows down past a couple of hundred live fibers.
static int run_all(bool small) {
  int passed = 0, failed = 0;
  auto expect = [&](const char* what, int got, int want, const char* needle) {
    const char* msg = st_error_string(got);
    const bool ok = got == want && (!needle || strstr(msg, needle));
    printf("%s %s\n", ok ? "ok  " : "FAIL", what);
    if (!ok) printf("     got %d (%s), expected %d with \"%s\"\n", got, msg, want, needle ? needle : "");
    (ok ? passed : failed)++;
  };
  auto correct = [&](const char* what, int rc) { expect(what, rc == OK ? 0 : -1, 0, nullptr); };

  if (small) {
    correct("block_sum 4x96", run_block_sum("block_sum", 4, 500, 96, 1));
  } else {
    correct("block_sum 8x256", run_block_sum("block_sum", 8, 3000, 256, 1));
    correct("block_sum 3x1024", run_block_sum("block_sum", 3, 1500, 1024, 1));
  }
  correct("block_sum 5x32", run_block_sum("block_sum", 5, 77, 32, 1));
  correct("histogram", small ? run_histogram("histogram", 3000, 37, 3, 64, 37)
                             : run_histogram("histogram", 20000, 37, 6, 128, 37));
  correct("warp_semantics", run_warp_semantics());
  correct("bad_launch", run_bad_launch());
  correct("concurrent launches", run_concurrent());

  std::vector<float> out(1024, 0.0f);
  std::vector<float> xs(100, 4.0f);
  xs[37] = -1.0f;
  expect("divergent __syncthreads", st_divergent_barrier(out.data(), 64), 715, "divergent __syncthreads");
  expect("divergent __syncthreads (odd size)", st_divergent_barrier(out.data(), 97), 715, "divergent __syncthreads");
  expect("partial last warp", st_partial_warp_mask(out.data(), 48), 715, "do not exist");
  expect("lanes missing from a shuffle", st_missing_lanes(out.data()), 715, "never arrives");
  expect("barrier vs shuffle deadlock", st_barrier_vs_shuffle(out.data()), 702, "deadlock");
  expect("__trap", st_trap(out.data()), 719, "__trap() at");
  expect("assert", st_assert(xs.data(), out.data(), 100), 710, "assertion");
  if (!kAsan) {  // under ASan the overrun aborts at the faulting write instead
    std::vector<unsigned> hist(37);
    std::vector<int> keys(1000, 36);
    float fs = 0;
    double ds = 0;
    int km = 0;
    unsigned long long c = 0;
    expect("dynamic shared memory too small",
           st_histogram(keys.data(), 1000, 37, hist.data(), &fs, &ds, &km, &c, 2, 64, 36), 700,
           "past the end of dynamic shared memory");
  }
  // the harness still works after all those errors
  correct("block_sum after errors", run_block_sum("block_sum", 4, 1000, 128, 1));
  correct("histogram after errors", run_histogram("histogram", 5000, 11, 3, 96, 11));
  printf("%d passed, %d failed\n", passed, failed);
  return failed ? WRONG : OK;
}

int main(int argc, char** argv) {
  const std::string c = argc > 1 ? argv[1] : "";
  if (c == "all") return run_all(argc > 2 && std::string(argv[2]) == "small");
  if (c == "block_sum")
    return run_block_sum("block_sum", arg(argc, argv, 2, 8), arg(argc, argv, 3, 3000), static_cast<int>(arg(argc, argv, 4, 256)), 1);
  if (c == "missing_sync")
    return run_block_sum("missing_sync", arg(argc, argv, 2, 8), arg(argc, argv, 3, 3000), static_cast<int>(arg(argc, argv, 4, 256)), 0);
  if (c == "histogram") return run_histogram("histogram", arg(argc, argv, 2, 20000), 37, 6, 128, 37);
  if (c == "smem_overrun") return run_histogram("smem_overrun", arg(argc, argv, 2, 2000), 37, 2, 64, 36);
  if (c == "warp_semantics") return run_warp_semantics();
  if (c == "bad_launch") return run_bad_launch();
  if (c == "concurrent") return run_concurrent();
  if (c == "oob_read") return run_oob_read();
  if (c == "divergent") return run_divergent(static_cast<int>(arg(argc, argv, 2, 64)));
  if (c == "partial_warp") return run_partial_warp(static_cast<int>(arg(argc, argv, 2, 48)));
  if (c == "missing_lanes") return run_simple("missing_lanes", st_missing_lanes, 64);
  if (c == "barrier_vs_shuffle") return run_simple("barrier_vs_shuffle", st_barrier_vs_shuffle, 32);
  if (c == "trap") return run_simple("trap", st_trap, 3 * 64);
  if (c == "assert") return run_assert();
  if (c == "stack_overflow") return run_simple("stack_overflow", st_stack_overflow, 4);
  if (c == "smem_uninit") return run_smem_uninit();
  if (c == "misaligned") return run_misaligned(0);
  if (c == "misaligned_ldg") return run_misaligned(1);
  if (c == "bench")
    return run_bench(arg(argc, argv, 2, 64), static_cast<int>(arg(argc, argv, 3, 256)), arg(argc, argv, 4, 4096),
                     static_cast<int>(arg(argc, argv, 5, 20)));
  fprintf(stderr,
          "usage: %s all [small] | block_sum [rows n threads] | missing_sync [rows n threads] | histogram [n] | "
          "smem_overrun [n] | warp_semantics | bad_launch | concurrent | oob_read | divergent [threads] | "
          "partial_warp [threads] | missing_lanes | barrier_vs_shuffle | trap | assert | stack_overflow | smem_uninit | misaligned | misaligned_ldg | bench [blocks threads n "
          "iters]\n",
          argv[0]);
  return USAGE;
}
