// simt_runtime.cpp - the out-of-line part of the SIMT emulation (see simt.h).
//
// Built once per sanitizer mode by tests/simt/build.py and linked into every
// emulated library. Under ThreadSanitizer this file must be compiled WITHOUT
// -fsanitize=thread and with -DSIMT_TSAN_RUNTIME: the scheduler state is
// handed from fiber to fiber without happens-before edges on purpose (fibers
// switch with __tsan_switch_to_fiber_no_sync), and only the kernels' own
// memory accesses, with the release/acquire edges of barriers and warp
// collectives given below, are what TSan should judge.
//
// Layout: configuration; context switch (x86-64 assembly, ucontext elsewhere);
// stack pool; per-launch worker and fibers; scheduling; barriers and warp
// collectives; errors; launch; the CUDA runtime API subset.

#include <dlfcn.h>
#include <elf.h>
#include <errno.h>
#include <link.h>
#include <signal.h>
#include <stdarg.h>
#include <sys/mman.h>
#include <unistd.h>

#include <mutex>
#include <string>
#include <system_error>
#include <thread>
#include <utility>
#include <vector>

#include "simt.h"

#if defined(SIMT_TSAN)
#error "compile simt_runtime.cpp without -fsanitize=thread and with -DSIMT_TSAN_RUNTIME (see tests/simt/build.py)"
#endif
#if defined(SIMT_TSAN_RUNTIME)
#define SIMT_RT_TSAN 1
#else
#define SIMT_RT_TSAN 0
#endif
#if defined(SIMT_ASAN)
#define SIMT_RT_ASAN 1
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#else
#define SIMT_RT_ASAN 0
#endif

#if SIMT_RT_TSAN
extern "C" {
void* __tsan_get_current_fiber(void);
void* __tsan_create_fiber(unsigned flags);
void __tsan_destroy_fiber(void* fiber);
void __tsan_switch_to_fiber(void* fiber, unsigned flags);
void __tsan_set_fiber_name(void* fiber, const char* name);
void __tsan_acquire(void* addr);
void __tsan_release(void* addr);
}
static const unsigned kTsanNoSync = 1;  // __tsan_switch_to_fiber_no_sync
#define TSAN_ACQUIRE(p) __tsan_acquire(p)
#define TSAN_RELEASE(p) __tsan_release(p)
#else
#define TSAN_ACQUIRE(p) ((void)(p))
#define TSAN_RELEASE(p) ((void)(p))
#endif

#if defined(__x86_64__) && !defined(SIMT_USE_UCONTEXT)
#define SIMT_ASM_SWITCH 1
#else
#define SIMT_ASM_SWITCH 0
#include <ucontext.h>
#endif

#pragma GCC visibility push(hidden)

namespace simt {
namespace detail {

// ---------------------------------------------------------------------------
// Configuration from the environment

static unsigned env_unsigned(const char* name, unsigned dflt, unsigned lo, unsigned hi) {
  const char* s = getenv(name);
  if (!s || !*s) return dflt;
  char* end = nullptr;
  unsigned long v = strtoul(s, &end, 10);
  if (*end != '\0') return dflt;
  if (v < lo) v = lo;
  if (v > hi) v = hi;
  return static_cast<unsigned>(v);
}

static size_t stack_bytes() {
#if SIMT_RT_ASAN
  const unsigned dflt_kb = 256;  // ASan's redzones make frames larger
#elif SIMT_RT_TSAN
  const unsigned dflt_kb = 128;
#else
  const unsigned dflt_kb = 64;
#endif
  return static_cast<size_t>(env_unsigned("SIMT_STACK_KB", dflt_kb, 16, 65536)) * 1024;
}

// ---------------------------------------------------------------------------
// Context switch
//
// simt_ctx_switch(save, next) pushes the callee-saved registers (and the x87
// control word and MXCSR, callee-saved by the SysV ABI) on the current stack,
// stores the stack pointer in *save, loads `next` and pops the same frame.
// A fresh context is a hand-made frame whose return address is the trampoline,
// which calls r13(r12).

#if SIMT_ASM_SWITCH
extern "C" void simt_ctx_switch(void** save, void* next);
extern "C" void simt_ctx_trampoline(void);
asm(R"(
    .text
    .p2align 4
    .globl simt_ctx_switch
    .hidden simt_ctx_switch
    .type simt_ctx_switch, @function
simt_ctx_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $16, %rsp
    fnstcw (%rsp)
    stmxcsr 8(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    fldcw (%rsp)
    ldmxcsr 8(%rsp)
    addq $16, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size simt_ctx_switch, .-simt_ctx_switch

    .p2align 4
    .globl simt_ctx_trampoline
    .hidden simt_ctx_trampoline
    .type simt_ctx_trampoline, @function
simt_ctx_trampoline:
    .cfi_startproc
    .cfi_undefined rip
    movq %r12, %rdi
    callq *%r13
    ud2
    .cfi_endproc
    .size simt_ctx_trampoline, .-simt_ctx_trampoline
)");

struct Ctx {
  void* sp = nullptr;
};

static void ctx_make(Ctx* c, char* lo, size_t size, void (*fn)(void*), void* arg) {
  uintptr_t top = (reinterpret_cast<uintptr_t>(lo) + size) & ~static_cast<uintptr_t>(15);
  uint64_t* s = reinterpret_cast<uint64_t*>(top - 72);  // top - 72 + 72 = top: 16-aligned at the call
#if SIMT_RT_ASAN
  // The frames of the previous block's fiber_main and fiber_exit never
  // returned: clear their redzones (deeper frames returned normally, or the
  // stack was marked dirty and cleared whole).
  const size_t clear = size < 16384 ? size : 16384;
  __asan_unpoison_memory_region(reinterpret_cast<char*>(top) - clear, clear);
#endif
  uint16_t cw;
  uint32_t mxcsr;
  asm volatile("fnstcw %0" : "=m"(cw));
  asm volatile("stmxcsr %0" : "=m"(mxcsr));
  s[0] = cw;
  s[1] = mxcsr;
  s[2] = 0;                                       // r15
  s[3] = 0;                                       // r14
  s[4] = reinterpret_cast<uint64_t>(fn);          // r13
  s[5] = reinterpret_cast<uint64_t>(arg);         // r12
  s[6] = 0;                                       // rbx
  s[7] = 0;                                       // rbp: ends frame-pointer unwinding
  s[8] = reinterpret_cast<uint64_t>(&simt_ctx_trampoline);
  c->sp = s;
}

static inline void ctx_swap(Ctx* from, Ctx* to) { simt_ctx_switch(&from->sp, to->sp); }

#else  // ucontext fallback: about 5-10x slower (a sigprocmask system call per switch)

struct Ctx {
  ucontext_t uc;
};

static void uc_entry(unsigned fn_hi, unsigned fn_lo, unsigned arg_hi, unsigned arg_lo) {
  uintptr_t fn = (static_cast<uintptr_t>(fn_hi) << 32) | fn_lo;
  uintptr_t arg = (static_cast<uintptr_t>(arg_hi) << 32) | arg_lo;
  reinterpret_cast<void (*)(void*)>(fn)(reinterpret_cast<void*>(arg));
  abort();  // fibers never return
}

static void ctx_make(Ctx* c, char* lo, size_t size, void (*fn)(void*), void* arg) {
  getcontext(&c->uc);
  c->uc.uc_stack.ss_sp = lo;
  c->uc.uc_stack.ss_size = size;
  c->uc.uc_link = nullptr;
  uintptr_t f = reinterpret_cast<uintptr_t>(fn), a = reinterpret_cast<uintptr_t>(arg);
  makecontext(&c->uc, reinterpret_cast<void (*)()>(&uc_entry), 4, static_cast<unsigned>(f >> 32),
              static_cast<unsigned>(f), static_cast<unsigned>(a >> 32), static_cast<unsigned>(a));
}

static inline void ctx_swap(Ctx* from, Ctx* to) { swapcontext(&from->uc, &to->uc); }

#endif

// ---------------------------------------------------------------------------
// Stack pool: fiber stacks (with a guard page below) outlive launches, so the
// pages a kernel touched stay mapped and later launches start fast.

struct StackSlot {
  char* map = nullptr;
  size_t map_size = 0;
  char* lo = nullptr;  // usable stack [lo, lo + size)
  size_t size = 0;
  void* tsan_fiber = nullptr;
  bool dirty = false;  // abandoned mid-kernel after an error
  StackSlot* next = nullptr;
  char name[96] = {0};
};

static std::mutex g_pool_mu;
static StackSlot* g_pool = nullptr;

static void slot_destroy(StackSlot* s) {
#if SIMT_RT_TSAN
  if (s->tsan_fiber) __tsan_destroy_fiber(s->tsan_fiber);
#endif
  munmap(s->map, s->map_size);
  delete s;
}

// Below each stack: a no-access guard region, so that an overflow faults
// instead of running into the next fiber's stack (build.py also compiles
// kernels with -fstack-clash-protection, which probes big frames page by page).
static const size_t kGuardBytes = 64 * 1024;

static StackSlot* slot_new(size_t size) {
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  const size_t guard = (kGuardBytes + page - 1) / page * page;
  size = (size + page - 1) / page * page;
  void* m = mmap(nullptr, size + guard, PROT_READ | PROT_WRITE,
                 MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_STACK, -1, 0);
  if (m == MAP_FAILED) return nullptr;
  mprotect(m, guard, PROT_NONE);
  StackSlot* s = new StackSlot;
  s->map = static_cast<char*>(m);
  s->map_size = size + guard;
  s->lo = s->map + guard;
  s->size = size;
  return s;
}

// Takes n stacks of `size` bytes; false when memory runs out.
static bool pool_get(std::vector<StackSlot*>& out, unsigned n, size_t size) {
  std::vector<StackSlot*> stale;
  {
    std::lock_guard<std::mutex> lock(g_pool_mu);
    while (out.size() < n && g_pool) {
      StackSlot* s = g_pool;
      g_pool = s->next;
      if (s->size == size)
        out.push_back(s);
      else
        stale.push_back(s);
    }
  }
  for (StackSlot* s : stale) slot_destroy(s);
  while (out.size() < n) {
    StackSlot* s = slot_new(size);
    if (!s) return false;
    out.push_back(s);
  }
#if SIMT_RT_TSAN
  for (StackSlot* s : out)
    if (!s->tsan_fiber) s->tsan_fiber = __tsan_create_fiber(0);
#endif
  return true;
}

static void pool_put(std::vector<StackSlot*>& slots) {
  for (StackSlot* s : slots) {
    if (s->dirty) {  // frames left behind by an aborted block
#if SIMT_RT_ASAN
      __asan_unpoison_memory_region(s->lo, s->size);
#endif
#if SIMT_RT_TSAN
      __tsan_destroy_fiber(s->tsan_fiber);
      s->tsan_fiber = nullptr;
#endif
      s->dirty = false;
    }
  }
  std::lock_guard<std::mutex> lock(g_pool_mu);
  for (StackSlot* s : slots) {
    s->next = g_pool;
    g_pool = s;
  }
  slots.clear();
}

// ---------------------------------------------------------------------------
// Launch, worker and fiber state

enum FiberState : int { F_READY, F_RUNNING, F_BARRIER, F_WARP, F_EXITED };

struct Worker;

struct Fiber {
  Ctx ctx;
  Worker* w = nullptr;
  StackSlot* stack = nullptr;
  uint3 idx{0, 0, 0};
  unsigned tid = 0, lane = 0, warp = 0;
  int state = F_READY;
  // the barrier or warp collective this fiber is in, and its contribution
  int op = 0;
  unsigned mask = 0;
  int arg = 0, width = 32;
  uint64_t val = 0, result = 0;
  const char* file = "";
  int line = 0;
  void* asan_fake = nullptr;
  // TSan sync objects: released on arrival at a barrier or collective,
  // acquired on departure (see tsan_rendezvous).
  char tsan_arrive = 0, tsan_depart = 0;
};

struct WarpState {
  unsigned exist = 0;    // lanes that exist (the last warp may be partial)
  unsigned exited = 0;   // lanes whose thread returned
  unsigned waiting = 0;  // lanes blocked in a warp collective
};

struct Launch {
  const char* name;
  dim3 grid, block;
  size_t smem;
  void (*invoke)(void*);
  void* call;
  unsigned nthreads;
  uint64_t nblocks;
  size_t stack_size;
  std::atomic<uint64_t> next_block{0};
  std::vector<unsigned> only_x;  // SIMT_ONLY_BLOCKS_X: run only these blockIdx.x (empty: all)
  std::atomic<bool> failed{false};
  std::mutex mu;
  cudaError_t err = cudaSuccess;
  std::string msg;
};

// Dynamic shared memory layout: [front canary][buffer][back canary].
static const size_t kCanaryFront = 128, kCanaryBack = 256;
static const unsigned char kCanaryByte = 0xA5, kFillByte = 0xFF;

struct Worker {
  Launch* L = nullptr;
  std::vector<Fiber> fibers;
  std::vector<StackSlot*> slots;
  std::vector<Fiber*> queue;  // ring of runnable fibers
  unsigned qhead = 0, qcount = 0;
  std::vector<WarpState> warps;
  unsigned n = 0, live = 0, at_barrier = 0, exited = 0;
  uint3 block{0, 0, 0};
  // the barrier being formed
  int bar_op = 0;
  const char* bar_file = "";
  int bar_line = 0;
  int bar_count = 0, bar_and = 1, bar_or = 0;
  // scheduler context (the worker thread's own stack)
  Ctx sched;
  void* sched_fake = nullptr;
  const void* sched_stack_lo = nullptr;
  size_t sched_stack_size = 0;
  bool switch_from_sched = false;
  void* sched_tsan = nullptr;
  char tsan_start = 0, tsan_exit = 0;
  // dynamic shared memory
  unsigned char* smem_alloc = nullptr;
  unsigned char* smem = nullptr;
  // error of the block being run
  bool failed = false;
  cudaError_t err = cudaSuccess;
  char msg[1536] = {0};
};

static const char* op_name(int op) {
  static const char* const names[OP_COUNT_] = {
      "__syncthreads", "__syncthreads_count", "__syncthreads_and", "__syncthreads_or",
      "__shfl_sync", "__shfl_up_sync", "__shfl_down_sync", "__shfl_xor_sync",
      "__ballot_sync", "__all_sync", "__any_sync", "__syncwarp",
      "__reduce_add_sync", "__reduce_min_sync", "__reduce_max_sync",
      "__reduce_min_sync", "__reduce_max_sync",
      "__reduce_and_sync", "__reduce_or_sync", "__reduce_xor_sync"};
  return op >= 0 && op < OP_COUNT_ ? names[op] : "?";
}

static bool same_site(const char* f1, int l1, const char* f2, int l2) {
  return l1 == l2 && (f1 == f2 || strcmp(f1, f2) == 0);
}

// ---------------------------------------------------------------------------
// Scheduling

static inline void push(Worker* w, Fiber* f) {
  f->state = F_READY;
  w->queue[(w->qhead + w->qcount++) % w->n] = f;
}

static inline Fiber* pop(Worker* w) {
  if (w->qcount == 0) return nullptr;
  Fiber* f = w->queue[w->qhead];
  w->qhead = (w->qhead + 1) % w->n;
  --w->qcount;
  return f;
}

// Code that runs right after a context resumes, as `self` (null: scheduler).
static inline void after_switch(Worker* w, Fiber* self) {
#if SIMT_RT_ASAN
  const void* lo = nullptr;
  size_t size = 0;
  __sanitizer_finish_switch_fiber(self ? self->asan_fake : w->sched_fake, &lo, &size);
  if (w->switch_from_sched) {  // learn the worker thread's own stack for later switches back
    w->sched_stack_lo = lo;
    w->sched_stack_size = size;
  }
#else
  (void)w;
  (void)self;
#endif
}

// Switch from `from` to `to` (null: the scheduler). `final_switch` when the
// current context will never be resumed.
static void transfer(Worker* w, Fiber* from, Fiber* to, bool final_switch) {
  Ctx* from_ctx = from ? &from->ctx : &w->sched;
  Ctx* to_ctx = to ? &to->ctx : &w->sched;
  tls.cur = to;
  if (to) {
    tls.thread_idx = to->idx;
    to->state = F_RUNNING;
  }
#if SIMT_RT_ASAN
  void** fake = final_switch ? nullptr : (from ? &from->asan_fake : &w->sched_fake);
  if (to)
    __sanitizer_start_switch_fiber(fake, to->stack->lo, to->stack->size);
  else
    __sanitizer_start_switch_fiber(fake, w->sched_stack_lo, w->sched_stack_size);
  w->switch_from_sched = (from == nullptr);
#else
  (void)final_switch;
#endif
#if SIMT_RT_TSAN
  __tsan_switch_to_fiber(to ? to->stack->tsan_fiber : w->sched_tsan, kTsanNoSync);
#endif
  ctx_swap(from_ctx, to_ctx);
  after_switch(w, from);
}

// Block the running fiber `f` until someone makes it runnable again.
static void wait_turn(Worker* w, Fiber* f) {
  Fiber* next = pop(w);
  if (next == f) {  // only possible after yield_fiber
    f->state = F_RUNNING;
    return;
  }
  transfer(w, f, next, false);
}

// ---------------------------------------------------------------------------
// Errors

static void vformat_error(Worker* w, const Fiber* f, cudaError_t code, const char* fmt, va_list ap) {
  int k;
  if (f)
    k = snprintf(w->msg, sizeof w->msg, "simt: kernel %s, block (%u,%u,%u), thread (%u,%u,%u): ", w->L->name,
                 w->block.x, w->block.y, w->block.z, f->idx.x, f->idx.y, f->idx.z);
  else
    k = snprintf(w->msg, sizeof w->msg, "simt: kernel %s, block (%u,%u,%u): ", w->L->name, w->block.x, w->block.y,
                 w->block.z);
  if (k < 0) k = 0;
  if (static_cast<size_t>(k) < sizeof w->msg) vsnprintf(w->msg + k, sizeof w->msg - k, fmt, ap);
  w->failed = true;
  w->err = code;
}

static void block_error(Worker* w, cudaError_t code, const char* fmt, ...) __attribute__((format(printf, 3, 4)));
static void block_error(Worker* w, cudaError_t code, const char* fmt, ...) {
  if (w->failed) return;
  va_list ap;
  va_start(ap, fmt);
  vformat_error(w, nullptr, code, fmt, ap);
  va_end(ap);
}

// Ends the block from inside fiber `f`: records the error and returns to the
// scheduler for good. The other fibers are abandoned where they stand.
[[noreturn]] static void fiber_fail(Fiber* f, cudaError_t code, const char* fmt, ...)
    __attribute__((format(printf, 3, 4)));
[[noreturn]] static void fiber_fail(Fiber* f, cudaError_t code, const char* fmt, ...) {
  Worker* w = f->w;
  va_list ap;
  va_start(ap, fmt);
  vformat_error(w, f, code, fmt, ap);
  va_end(ap);
  TSAN_RELEASE(&w->tsan_exit);  // the scheduler reads the message
  transfer(w, f, nullptr, true);
  abort();  // never resumed
}

// ---------------------------------------------------------------------------
// Fiber life

static void fiber_exit(Fiber* f) {
  Worker* w = f->w;
  WarpState& ws = w->warps[f->warp];
  const unsigned me = 1u << f->lane;
  f->state = F_EXITED;
  --w->live;
  ++w->exited;
  ws.exited |= me;
  TSAN_RELEASE(&w->tsan_exit);
  if (w->at_barrier > 0)
    fiber_fail(f, cudaErrorIllegalInstruction,
               "divergent __syncthreads: thread exited while %u thread(s) of its block wait in %s at %s:%d",
               w->at_barrier, op_name(w->bar_op), w->bar_file, w->bar_line);
  for (unsigned bits = ws.waiting; bits; bits &= bits - 1) {
    const Fiber* g = &w->fibers[f->warp * 32 + __builtin_ctz(bits)];
    if (g->mask & me)
      fiber_fail(f, cudaErrorIllegalInstruction,
                 "lane %u exited while lane %u waits for it in %s at %s:%d: the mask 0x%08x names a lane that "
                 "never arrives",
                 f->lane, g->lane, op_name(g->op), g->file, g->line, g->mask);
  }
  transfer(w, f, pop(w), true);
  abort();  // never resumed
}

static void fiber_main(void* arg) {
  Fiber* f = static_cast<Fiber*>(arg);
  Worker* w = f->w;
  after_switch(w, f);
  TSAN_ACQUIRE(&w->tsan_start);
  w->L->invoke(w->L->call);
  fiber_exit(f);
}

// ---------------------------------------------------------------------------
// Barriers

// TSan edges for a completed rendezvous: the running fiber (the last to
// arrive) joins every participant's arrival and hands the join to each
// participant's departure. A participant that ran ahead cannot pollute this:
// it cannot arrive anywhere again before it departs from here.
static inline void tsan_rendezvous(Fiber* const* parts, unsigned count) {
#if SIMT_RT_TSAN
  for (unsigned i = 0; i < count; ++i) __tsan_acquire(&parts[i]->tsan_arrive);
  for (unsigned i = 0; i < count; ++i) __tsan_release(&parts[i]->tsan_depart);
#else
  (void)parts;
  (void)count;
#endif
}

int block_barrier(int op, int pred, const char* file, int line) {
  Fiber* f = tls.cur;
  if (!f) return pred;  // host code: nothing to wait for
  Worker* w = f->w;
  if (w->exited)
    fiber_fail(f, cudaErrorIllegalInstruction,
               "divergent __syncthreads: %s at %s:%d is reached after %u thread(s) of the block exited",
               op_name(op), file, line, w->exited);
  if (w->at_barrier == 0) {
    w->bar_op = op;
    w->bar_file = file;
    w->bar_line = line;
    w->bar_count = 0;
    w->bar_and = 1;
    w->bar_or = 0;
  } else if (w->bar_op != op || !same_site(file, line, w->bar_file, w->bar_line)) {
    fiber_fail(f, cudaErrorIllegalInstruction,
               "divergent __syncthreads: this thread is at %s at %s:%d while %u thread(s) wait in %s at %s:%d",
               op_name(op), file, line, w->at_barrier, op_name(w->bar_op), w->bar_file, w->bar_line);
  }
  w->bar_count += pred;
  w->bar_and &= pred;
  w->bar_or |= pred;
  f->state = F_BARRIER;
  f->op = op;
  f->file = file;
  f->line = line;
  ++w->at_barrier;
  TSAN_RELEASE(&f->tsan_arrive);
  if (w->at_barrier == w->live) {  // everyone is here (and nobody exited)
    const int result = op == OP_SYNCTHREADS_COUNT ? w->bar_count
                       : op == OP_SYNCTHREADS_AND ? w->bar_and
                       : op == OP_SYNCTHREADS_OR  ? w->bar_or
                                                  : 0;
#if SIMT_RT_TSAN
    std::vector<Fiber*> parts;
    for (Fiber& g : w->fibers) parts.push_back(&g);
    tsan_rendezvous(parts.data(), static_cast<unsigned>(parts.size()));
#endif
    w->at_barrier = 0;
    for (Fiber& g : w->fibers) {
      g.result = static_cast<uint64_t>(result);
      if (&g != f) push(w, &g);
    }
    f->state = F_RUNNING;
    TSAN_ACQUIRE(&f->tsan_depart);
    return result;
  }
  wait_turn(w, f);
  TSAN_ACQUIRE(&f->tsan_depart);
  return static_cast<int>(f->result);
}

// ---------------------------------------------------------------------------
// Warp collectives: a rendezvous of the lanes named in the mask. All of them
// must arrive at the same kind of collective with the same mask (possibly at
// different call sites, as sm_70+ allows).

static const uint64_t kPoison = ~static_cast<uint64_t>(0);  // NaN / -1: a value read from a lane outside the mask

static inline bool is_shfl(int op) { return op >= OP_SHFL_IDX && op <= OP_SHFL_XOR; }

// Source lane of a shuffle, with PTX shfl.sync's segment (width) rules.
static unsigned shfl_source(int op, unsigned lane, int arg, int width) {
  const unsigned seg = 32u - static_cast<unsigned>(width);  // lane bits that select the segment
  const unsigned b = static_cast<unsigned>(arg) & 31u;
  const int start = static_cast<int>(lane & seg), last = static_cast<int>((lane & seg) | (31u & ~seg));
  int j;
  bool ok;
  switch (op) {
    case OP_SHFL_IDX: j = start | static_cast<int>(b & ~seg); ok = true; break;
    case OP_SHFL_UP: j = static_cast<int>(lane) - static_cast<int>(b); ok = j >= start; break;
    case OP_SHFL_DOWN: j = static_cast<int>(lane + b); ok = j <= last; break;
    default: j = static_cast<int>(lane ^ b); ok = j <= last; break;  // xor
  }
  return ok ? static_cast<unsigned>(j) : lane;
}

// Computes every participant's result; parts[i] is lane lanes[i].
static void warp_compute(Fiber* const* parts, unsigned count, unsigned mask, Fiber* const* by_lane) {
  const int op = parts[0]->op;
  if (is_shfl(op)) {
    for (unsigned i = 0; i < count; ++i) {
      Fiber* g = parts[i];
      unsigned j = shfl_source(op, g->lane, g->arg, g->width);
      g->result = (mask >> j & 1u) ? by_lane[j]->val : kPoison;
    }
    return;
  }
  uint64_t r = 0;
  unsigned bits = 0;
  for (unsigned i = 0; i < count; ++i) {
    const Fiber* g = parts[i];
    const uint32_t v = static_cast<uint32_t>(g->val);
    if (v) bits |= 1u << g->lane;
    const bool first = i == 0;
    switch (op) {
      case OP_REDUCE_ADD_U: r = static_cast<uint32_t>(r + v); break;
      case OP_REDUCE_MIN_U: r = first || v < r ? v : r; break;
      case OP_REDUCE_MAX_U: r = first || v > r ? v : r; break;
      case OP_REDUCE_MIN_I:
        r = first || static_cast<int32_t>(v) < static_cast<int32_t>(r) ? v : r;
        break;
      case OP_REDUCE_MAX_I:
        r = first || static_cast<int32_t>(v) > static_cast<int32_t>(r) ? v : r;
        break;
      case OP_REDUCE_AND: r = first ? v : (r & v); break;
      case OP_REDUCE_OR: r |= v; break;
      case OP_REDUCE_XOR: r ^= v; break;
      default: break;
    }
  }
  if (op == OP_BALLOT) r = bits;
  if (op == OP_ALL) r = bits == mask;
  if (op == OP_ANY) r = bits != 0;
  if (op == OP_SYNCWARP) r = 0;
  for (unsigned i = 0; i < count; ++i) parts[i]->result = r;
}

uint64_t warp_op(int op, unsigned mask, uint64_t val, int arg, int width, const char* file, int line) {
  Fiber* f = tls.cur;
  if (!f) return op == OP_BALLOT ? (val != 0) : val;  // host code: a lone lane 0
  Worker* w = f->w;
  WarpState& ws = w->warps[f->warp];
  const unsigned me = 1u << f->lane;
  const char* name = op_name(op);
  if (is_shfl(op) && (width < 1 || width > 32 || (width & (width - 1)) != 0))
    fiber_fail(f, cudaErrorIllegalInstruction, "%s at %s:%d: width %d is not a power of two in [1, 32]", name, file,
               line, width);
  if (!(mask & me))
    fiber_fail(f, cudaErrorIllegalInstruction, "%s at %s:%d: mask 0x%08x does not name the calling lane %u", name,
               file, line, mask, f->lane);
  if (mask & ~ws.exist)
    fiber_fail(f, cudaErrorIllegalInstruction,
               "%s at %s:%d: mask 0x%08x names lane(s) 0x%08x that do not exist (warp %u has lanes 0x%08x: "
               "partial last warp)",
               name, file, line, mask, mask & ~ws.exist, f->warp, ws.exist);
  if (mask & ws.exited)
    fiber_fail(f, cudaErrorIllegalInstruction, "%s at %s:%d: mask 0x%08x names lane(s) 0x%08x that exited", name,
               file, line, mask, mask & ws.exited);
  f->op = op;
  f->mask = mask;
  f->val = val;
  f->arg = arg;
  f->width = width;
  f->file = file;
  f->line = line;

  const unsigned others = mask & ~me;
  if ((others & ~ws.waiting) == 0) {  // every other named lane waits somewhere: is it here?
    Fiber* by_lane[32];
    Fiber* parts[32];
    unsigned count = 0;
    bool complete = true;
    for (unsigned bits = mask; bits; bits &= bits - 1) {
      unsigned l = static_cast<unsigned>(__builtin_ctz(bits));
      Fiber* g = &w->fibers[f->warp * 32 + l];
      by_lane[l] = g;
      parts[count++] = g;
      if (g == f) continue;
      if (!(g->mask & me)) {  // g is in another collective that does not involve this lane
        complete = false;
        break;
      }
      if (g->op != op || g->mask != mask || g->width != width)
        fiber_fail(f, cudaErrorIllegalInstruction,
                   "warp collective mismatch: this lane (%u) is at %s at %s:%d with mask 0x%08x while lane %u waits "
                   "in %s at %s:%d with mask 0x%08x",
                   f->lane, name, file, line, mask, g->lane, op_name(g->op), g->file, g->line, g->mask);
    }
    if (complete) {
      warp_compute(parts, count, mask, by_lane);
      tsan_rendezvous(parts, count);
      for (unsigned i = 0; i < count; ++i) {
        Fiber* g = parts[i];
        if (g == f) continue;
        ws.waiting &= ~(1u << g->lane);
        push(w, g);
      }
      TSAN_ACQUIRE(&f->tsan_depart);
      return f->result;
    }
  }
  f->state = F_WARP;
  ws.waiting |= me;
  TSAN_RELEASE(&f->tsan_arrive);
  wait_turn(w, f);
  TSAN_ACQUIRE(&f->tsan_depart);
  return f->result;
}

unsigned active_mask() {
  Fiber* f = tls.cur;
  if (!f) return 1u;
  const WarpState& ws = f->w->warps[f->warp];
  return ws.exist & ~ws.exited;
}

void yield_fiber() {
  Fiber* f = tls.cur;
  if (!f) return;
  push(f->w, f);
  wait_turn(f->w, f);
}

void trap(const char* what, const char* file, int line) {
  if (Fiber* f = tls.cur) fiber_fail(f, cudaErrorLaunchFailure, "%s at %s:%d", what, file, line);
  fprintf(stderr, "simt: %s at %s:%d outside a kernel\n", what, file, line);
  abort();
}

void misaligned(const void* p, unsigned size, const char* what, unsigned align, const char* file, int line) {
  if (Fiber* f = tls.cur)
    fiber_fail(f, cudaErrorMisalignedAddress, "misaligned address %p: %u-byte %s needs %u-byte alignment, at %s:%d", p,
               size, what, align, file, line);
  fprintf(stderr, "simt: misaligned address %p: %u-byte %s needs %u-byte alignment, at %s:%d (outside a kernel)\n",
          p, size, what, align, file, line);
  abort();
}

// ---------------------------------------------------------------------------
// Static __shared__ memory: `static thread_local` variables (simt.h), one copy
// per worker thread. Before every block, run_block fills each with 0xFF bytes
// (NaN, -1), as dynamic shared memory is, so a read of a slot the block did not
// write is seen, whatever an earlier block or launch left there. They are
// found once, in the symbol table of the module holding this runtime: the TLS
// symbols of function-local statics (C++ names "_ZZ...": a __shared__ at
// namespace scope is not found), at their offset from simt::detail::tls.

struct SmemVar {
  ptrdiff_t off;  // from &tls
  size_t size;
};
static std::vector<SmemVar>* g_smem_vars = nullptr;
static std::once_flag g_smem_once;

static int find_module(struct dl_phdr_info* info, size_t, void* data) {
  auto* want = static_cast<std::pair<uintptr_t, std::string>*>(data);
  for (int i = 0; i < info->dlpi_phnum; ++i) {
    const ElfW(Phdr)& ph = info->dlpi_phdr[i];
    if (ph.p_type != PT_LOAD) continue;
    const uintptr_t lo = info->dlpi_addr + ph.p_vaddr;
    if (want->first >= lo && want->first < lo + ph.p_memsz) {
      want->second = info->dlpi_name && info->dlpi_name[0] ? info->dlpi_name : "/proc/self/exe";
      return 1;
    }
  }
  return 0;
}

static void find_static_smem() {
  g_smem_vars = new std::vector<SmemVar>;
  std::pair<uintptr_t, std::string> mod{reinterpret_cast<uintptr_t>(&find_module), std::string()};
  dl_iterate_phdr(find_module, &mod);
  FILE* fp = mod.second.empty() ? nullptr : fopen(mod.second.c_str(), "rb");
  std::vector<char> img;
  if (fp) {
    char buf[1 << 16];
    size_t k;
    while ((k = fread(buf, 1, sizeof buf, fp)) > 0) img.insert(img.end(), buf, buf + k);
    fclose(fp);
  }
  auto fail = [&](const char* why) {
    fprintf(stderr, "simt: static __shared__ memory is not poisoned between blocks (%s: %s)\n", mod.second.c_str(),
            why);
    g_smem_vars->clear();
  };
  if (img.size() < sizeof(ElfW(Ehdr)) || memcmp(img.data(), ELFMAG, SELFMAG) != 0) return fail("not an ELF file");
  const auto* eh = reinterpret_cast<const ElfW(Ehdr)*>(img.data());
  if (eh->e_shoff == 0 || eh->e_shoff + eh->e_shnum * sizeof(ElfW(Shdr)) > img.size()) return fail("no sections");
  const auto* sh = reinterpret_cast<const ElfW(Shdr)*>(img.data() + eh->e_shoff);
  bool have_anchor = false;
  ElfW(Addr) anchor = 0;
  std::vector<std::pair<ElfW(Addr), size_t>> found;
  for (unsigned i = 0; i < eh->e_shnum; ++i) {
    if (sh[i].sh_type != SHT_SYMTAB || sh[i].sh_link >= eh->e_shnum) continue;
    const ElfW(Shdr)& strs = sh[sh[i].sh_link];
    if (sh[i].sh_offset + sh[i].sh_size > img.size() || strs.sh_offset + strs.sh_size > img.size()) continue;
    const auto* sym = reinterpret_cast<const ElfW(Sym)*>(img.data() + sh[i].sh_offset);
    const size_t n = sh[i].sh_size / sizeof(ElfW(Sym));
    for (size_t j = 0; j < n; ++j) {
      if (ELF64_ST_TYPE(sym[j].st_info) != STT_TLS || sym[j].st_name >= strs.sh_size) continue;
      const char* name = img.data() + strs.sh_offset + sym[j].st_name;
      if (strcmp(name, "_ZN4simt6detail3tlsE") == 0) {
        have_anchor = true;
        anchor = sym[j].st_value;
      } else if (strncmp(name, "_ZZ", 3) == 0 && sym[j].st_size) {
        found.emplace_back(sym[j].st_value, sym[j].st_size);
      }
    }
  }
  if (!have_anchor) return fail("no symbol table (stripped?)");
  std::sort(found.begin(), found.end());
  found.erase(std::unique(found.begin(), found.end()), found.end());
  for (auto& v : found)
    g_smem_vars->push_back(SmemVar{static_cast<ptrdiff_t>(v.first) - static_cast<ptrdiff_t>(anchor), v.second});
}

static void poison_static_smem() {
  std::call_once(g_smem_once, find_static_smem);
  unsigned char* base = reinterpret_cast<unsigned char*>(&tls);
  for (const SmemVar& v : *g_smem_vars) memset(base + v.off, kFillByte, v.size);
}

// ---------------------------------------------------------------------------
// Fiber stack overflow: a plain build names the kernel, block and thread on
// stderr, then lets the fault go on to the previous SIGSEGV handler (Python's
// faulthandler, or the default: the process dies as it would have). ASan and
// TSan builds have their own SIGSEGV reports.

#if !SIMT_RT_ASAN && !SIMT_RT_TSAN
static struct sigaction g_prev_segv;

static void on_segv(int sig, siginfo_t* si, void* uctx) {
  (void)uctx;
  const Fiber* f = tls.cur;
  const char* a = static_cast<const char*>(si->si_addr);
  if (f && a >= f->stack->map && a < f->stack->lo) {
    char buf[512];
    int k = snprintf(buf, sizeof buf,
                     "simt: kernel %s, block (%u,%u,%u), thread (%u,%u,%u): fiber stack overflow (%zu KiB); raise "
                     "SIMT_STACK_KB\n",
                     f->w->L->name, f->w->block.x, f->w->block.y, f->w->block.z, f->idx.x, f->idx.y, f->idx.z,
                     f->stack->size / 1024);
    if (k > 0) {
      ssize_t r = write(2, buf, std::min(static_cast<size_t>(k), sizeof buf - 1));
      (void)r;
    }
  }
  sigaction(sig, &g_prev_segv, nullptr);  // returning re-runs the access under the previous handler
}

static void install_segv_handler() {
  static std::once_flag once;
  std::call_once(once, [] {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = &on_segv;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGSEGV, &sa, &g_prev_segv);
  });
}

// The handler needs a stack of its own: the faulting fiber's is exhausted.
// Keeps a thread's existing alternate stack (Python's faulthandler sets one).
struct AltStack {
  std::vector<char> mem;
  bool installed = false;
  AltStack() {
    stack_t cur;
    if (sigaltstack(nullptr, &cur) != 0 || !(cur.ss_flags & SS_DISABLE)) return;
    mem.resize(64 * 1024);
    stack_t ss;
    ss.ss_sp = mem.data();
    ss.ss_size = mem.size();
    ss.ss_flags = 0;
    installed = sigaltstack(&ss, nullptr) == 0;
  }
  ~AltStack() {
    if (!installed) return;
    stack_t ss;
    memset(&ss, 0, sizeof ss);
    ss.ss_flags = SS_DISABLE;
    sigaltstack(&ss, nullptr);
  }
  AltStack(const AltStack&) = delete;
  AltStack& operator=(const AltStack&) = delete;
};
#else
static void install_segv_handler() {}
struct AltStack {};
#endif

// ---------------------------------------------------------------------------
// Running a block

// A bounded message buffer.
struct MsgBuf {
  char s[1024];
  size_t k = 0;
  MsgBuf() { s[0] = 0; }
  void add(const char* fmt, ...) __attribute__((format(printf, 2, 3))) {
    if (k >= sizeof s) return;
    va_list ap;
    va_start(ap, fmt);
    int r = vsnprintf(s + k, sizeof s - k, fmt, ap);
    va_end(ap);
    if (r > 0) k += static_cast<size_t>(r);
  }
};

// Describes who waits where when no fiber of the block can run.
static void report_deadlock(Worker* w) {
  MsgBuf m;
  m.add("%sdeadlock: %u live thread(s) and none can proceed", w->at_barrier ? "divergent __syncthreads: " : "",
        w->live);
  if (w->at_barrier) m.add("; %u wait in %s at %s:%d", w->at_barrier, op_name(w->bar_op), w->bar_file, w->bar_line);
  int shown = 0;
  for (unsigned wi = 0; wi < w->warps.size() && shown < 4; ++wi) {
    const WarpState& ws = w->warps[wi];
    if (!ws.waiting) continue;
    const Fiber* g = &w->fibers[wi * 32 + __builtin_ctz(ws.waiting)];  // one line per warp
    const unsigned missing = g->mask & ~ws.waiting;
    m.add("; warp %u lane %u waits in %s at %s:%d with mask 0x%08x", wi, g->lane, op_name(g->op), g->file, g->line,
          g->mask);
    if (missing)
      m.add(" for lane(s) 0x%08x that never arrive", missing);
    else
      m.add(" (the lanes it names wait in other collectives)");
    ++shown;
  }
  block_error(w, cudaErrorLaunchTimeout, "%s", m.s);
}

static void run_block(Worker* w, uint64_t b) {
  Launch* L = w->L;
  const dim3 g = L->grid;
  w->block = uint3{static_cast<unsigned>(b % g.x), static_cast<unsigned>(b / g.x % g.y),
                   static_cast<unsigned>(b / (static_cast<uint64_t>(g.x) * g.y))};
  tls.block_idx = w->block;
  if (L->smem) memset(w->smem, kFillByte, L->smem);
  poison_static_smem();
  w->qhead = 0;
  w->qcount = 0;
  for (unsigned i = 0; i < w->n; ++i) {
    Fiber& f = w->fibers[i];
    f.state = F_READY;
    f.asan_fake = nullptr;
    ctx_make(&f.ctx, f.stack->lo, f.stack->size, &fiber_main, &f);
#if SIMT_RT_TSAN
    snprintf(f.stack->name, sizeof f.stack->name, "simt block (%u,%u,%u) thread (%u,%u,%u)", w->block.x,
             w->block.y, w->block.z, f.idx.x, f.idx.y, f.idx.z);
    __tsan_set_fiber_name(f.stack->tsan_fiber, f.stack->name);
#endif
    push(w, &f);
  }
  for (WarpState& ws : w->warps) ws.exited = ws.waiting = 0;
  w->live = w->n;
  w->at_barrier = w->exited = 0;
  TSAN_RELEASE(&w->tsan_start);
  while (Fiber* f = pop(w)) {
    transfer(w, nullptr, f, false);
    if (w->failed) break;
  }
  TSAN_ACQUIRE(&w->tsan_exit);
  if (!w->failed && w->live) report_deadlock(w);
  if (w->failed) {
    for (Fiber& f : w->fibers) {  // frames abandoned mid-kernel
      if (f.state == F_EXITED) continue;
      f.stack->dirty = true;
#if SIMT_RT_TSAN
      // An abandoned fiber never reaches its exit release: let the scheduler
      // acquire what it did (a synchronising switch there and back, with no
      // stack change in between) before the caller reuses its arguments.
      __tsan_switch_to_fiber(f.stack->tsan_fiber, 0);
      __tsan_switch_to_fiber(w->sched_tsan, 0);
#endif
    }
    return;
  }
#if !SIMT_RT_ASAN  // under ASan the canaries are poisoned: an overrun is reported at the faulting access
  const unsigned char* front = w->smem - kCanaryFront;
  const unsigned char* back = w->smem + L->smem;
  for (size_t i = 0; i < kCanaryFront; ++i)
    if (front[i] != kCanaryByte) {
      block_error(w, cudaErrorIllegalAddress,
                  "write before the start of dynamic shared memory: byte %zd of the %zu-byte buffer was overwritten",
                  static_cast<ptrdiff_t>(i) - static_cast<ptrdiff_t>(kCanaryFront), L->smem);
      break;
    }
  if (!w->failed)
    for (size_t i = 0; i < kCanaryBack; ++i)
      if (back[i] != kCanaryByte) {
        block_error(w, cudaErrorIllegalAddress,
                    "write past the end of dynamic shared memory: byte %zu past the end of the %zu-byte buffer "
                    "(smem_bytes of the launch) was overwritten",
                    i, L->smem);
        break;
      }
  if (w->failed) {
    memset(w->smem - kCanaryFront, kCanaryByte, kCanaryFront);
    memset(w->smem + L->smem, kCanaryByte, kCanaryBack);
  }
#endif
}

static bool worker_setup(Worker* w, Launch* L) {
  w->L = L;
  w->n = L->nthreads;
  if (!pool_get(w->slots, w->n, L->stack_size)) return false;
  w->fibers.resize(w->n);
  w->queue.assign(w->n, nullptr);
  w->warps.assign((w->n + 31) / 32, WarpState{});
  const dim3 bd = L->block;
  for (unsigned i = 0; i < w->n; ++i) {
    Fiber& f = w->fibers[i];
    f.w = w;
    f.stack = w->slots[i];
    f.tid = i;
    f.lane = i % 32;
    f.warp = i / 32;
    f.idx = uint3{i % bd.x, i / bd.x % bd.y, i / (bd.x * bd.y)};
    w->warps[f.warp].exist |= 1u << f.lane;
  }
  const size_t total = kCanaryFront + L->smem + kCanaryBack;
  void* p = nullptr;
  if (posix_memalign(&p, 128, (total + 127) / 128 * 128) != 0) return false;
  w->smem_alloc = static_cast<unsigned char*>(p);
  w->smem = w->smem_alloc + kCanaryFront;
  memset(w->smem_alloc, kCanaryByte, kCanaryFront);
  memset(w->smem + L->smem, kCanaryByte, kCanaryBack);
#if SIMT_RT_ASAN
  __asan_poison_memory_region(w->smem_alloc, kCanaryFront);
  __asan_poison_memory_region(w->smem + L->smem, kCanaryBack);
#endif
#if SIMT_RT_TSAN
  w->sched_tsan = __tsan_get_current_fiber();
#endif
  return true;
}

static void worker_teardown(Worker* w) {
  if (w->smem_alloc) {
#if SIMT_RT_ASAN
    __asan_unpoison_memory_region(w->smem_alloc, kCanaryFront + w->L->smem + kCanaryBack);
#endif
    free(w->smem_alloc);
  }
  pool_put(w->slots);
}

static void worker_main(Launch* L) {
  [[maybe_unused]] AltStack alt;  // for the SIGSEGV handler (plain builds)
  Worker w;
  const Tls saved = tls;
  bool ok = worker_setup(&w, L);
  if (!ok) {
    std::lock_guard<std::mutex> lock(L->mu);
    if (L->err == cudaSuccess) {
      L->err = cudaErrorMemoryAllocation;
      L->msg = std::string("simt: kernel ") + L->name + ": out of memory for fiber stacks or shared memory";
    }
    L->failed = true;
  }
  tls.block_dim = L->block;
  tls.grid_dim = L->grid;
  tls.dyn_smem = w.smem;
  tls.worker = &w;
  while (ok && !L->failed.load(std::memory_order_relaxed)) {
    const uint64_t b = L->next_block.fetch_add(1);
    if (b >= L->nblocks) break;
    if (!L->only_x.empty() &&
        std::find(L->only_x.begin(), L->only_x.end(), static_cast<unsigned>(b % L->grid.x)) == L->only_x.end())
      continue;
    run_block(&w, b);
    if (w.failed) {
      std::lock_guard<std::mutex> lock(L->mu);
      if (L->err == cudaSuccess) {
        L->err = w.err;
        L->msg = w.msg;
      }
      L->failed = true;
    }
  }
  worker_teardown(&w);
  tls = saved;
}

// ---------------------------------------------------------------------------
// Launch

static thread_local cudaError_t t_last_error = cudaSuccess;
static thread_local cudaError_t t_msg_code = cudaSuccess;
static thread_local char t_msg[2048];

static void set_error(cudaError_t code, const std::string& msg) {
  t_last_error = code;
  t_msg_code = code;
  snprintf(t_msg, sizeof t_msg, "%s", msg.c_str());
  if (!getenv("SIMT_QUIET") || strcmp(getenv("SIMT_QUIET"), "0") == 0) fprintf(stderr, "%s\n", t_msg);
}

static std::mutex g_attr_mu;
static std::vector<std::pair<const void*, int>>* g_attr = nullptr;  // function -> max dynamic smem

cudaError_t func_set_attribute(const void* func, int attr, int value) {
  if (attr == cudaFuncAttributePreferredSharedMemoryCarveout) return cudaSuccess;
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize || value < 0 || value > 227 * 1024) {
    t_last_error = cudaErrorInvalidValue;
    return cudaErrorInvalidValue;
  }
  std::lock_guard<std::mutex> lock(g_attr_mu);
  if (!g_attr) g_attr = new std::vector<std::pair<const void*, int>>;
  for (auto& e : *g_attr)
    if (e.first == func) {
      e.second = value;
      return cudaSuccess;
    }
  g_attr->emplace_back(func, value);
  return cudaSuccess;
}

static size_t max_dynamic_smem(const void* func) {
  std::lock_guard<std::mutex> lock(g_attr_mu);
  if (g_attr)
    for (auto& e : *g_attr)
      if (e.first == func) return static_cast<size_t>(e.second);
  return 48 * 1024;
}

cudaError_t occupancy(int* blocks, int block_size, size_t smem) {
  if (!blocks || block_size <= 0) return cudaErrorInvalidValue;
  int by_threads = 2048 / block_size;
  int by_smem = smem ? static_cast<int>(228 * 1024 / (smem + 1024)) : 32;
  *blocks = std::max(0, std::min(std::min(by_threads, by_smem), 32));
  return cudaSuccess;
}

cudaError_t launch(const char* name, const void* func, dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                   void (*invoke)(void*), void* call) {
  (void)stream;  // everything is synchronous
  char buf[512];
  auto config_error = [&](cudaError_t code, const char* what) {
    snprintf(buf, sizeof buf,
             "simt: kernel %s: launch refused (%s): %s; grid (%u,%u,%u), block (%u,%u,%u), %zu bytes of dynamic "
             "shared memory",
             name,
             code == cudaErrorInvalidValue           ? "invalid argument"
             : code == cudaErrorInvalidConfiguration ? "invalid configuration argument"
                                                     : "operation not supported",
             what,
             grid.x, grid.y, grid.z, block.x, block.y, block.z, smem);
    set_error(code, buf);
    return code;
  };
  if (tls.cur || tls.worker)
    return config_error(cudaErrorNotSupported, "launch from inside a kernel (dynamic parallelism) is not emulated");
  const uint64_t nthreads = static_cast<uint64_t>(block.x) * block.y * block.z;
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) return config_error(cudaErrorInvalidConfiguration, "empty grid");
  if (nthreads == 0) return config_error(cudaErrorInvalidConfiguration, "empty block");
  if (block.x > 1024 || block.y > 1024 || block.z > 64 || nthreads > 1024)
    return config_error(cudaErrorInvalidConfiguration, "a block holds at most 1024 threads (z at most 64)");
  if (grid.x > 2147483647u || grid.y > 65535 || grid.z > 65535)
    return config_error(cudaErrorInvalidConfiguration, "grid.x is at most 2^31-1, grid.y and grid.z at most 65535");
  const size_t smem_cap = std::min<size_t>(max_dynamic_smem(func), 227 * 1024);
  if (smem > smem_cap)
    return config_error(cudaErrorInvalidValue,
                        smem > 227 * 1024
                            ? "dynamic shared memory above the 227 KiB a block can have"
                            : "dynamic shared memory above the kernel's limit (48 KiB unless raised with "
                              "cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes))");

  install_segv_handler();
  Launch L;
  L.name = name;
  L.grid = grid;
  L.block = block;
  L.smem = smem;
  L.invoke = invoke;
  L.call = call;
  L.nthreads = static_cast<unsigned>(nthreads);
  L.nblocks = static_cast<uint64_t>(grid.x) * grid.y * grid.z;
  L.stack_size = stack_bytes();
  // SIMT_ONLY_BLOCKS_X=i,j,...: run only the blocks with these blockIdx.x (the
  // others do nothing); for a test of a huge grid's last rows
  if (const char* only = getenv("SIMT_ONLY_BLOCKS_X")) {
    for (const char* q = only; *q;) {
      char* end = nullptr;
      const unsigned long v = strtoul(q, &end, 10);
      if (end == q) break;
      L.only_x.push_back(static_cast<unsigned>(v));
      q = *end == ',' ? end + 1 : end;
    }
  }
  const unsigned nworkers =
      static_cast<unsigned>(std::min<uint64_t>(env_unsigned("SIMT_WORKERS", 2, 1, 256), L.nblocks));
  std::vector<std::thread> threads;
  try {
    for (unsigned i = 1; i < nworkers; ++i) threads.emplace_back(worker_main, &L);
  } catch (const std::system_error&) {  // no more threads: the ones we have do the work
  }
  worker_main(&L);  // the calling thread works too
  for (std::thread& t : threads) t.join();
  if (L.err != cudaSuccess) {
    set_error(L.err, L.msg);
    return L.err;
  }
  return cudaSuccess;
}

}  // namespace detail
}  // namespace simt

// ---------------------------------------------------------------------------
// CUDA runtime API subset

using simt::detail::t_last_error;
using simt::detail::t_msg;
using simt::detail::t_msg_code;

static const char* error_name(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorMemoryAllocation: return "cudaErrorMemoryAllocation";
    case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
    case cudaErrorInvalidDeviceFunction: return "cudaErrorInvalidDeviceFunction";
    case cudaErrorNoDevice: return "cudaErrorNoDevice";
    case cudaErrorIllegalAddress: return "cudaErrorIllegalAddress";
    case cudaErrorLaunchOutOfResources: return "cudaErrorLaunchOutOfResources";
    case cudaErrorLaunchTimeout: return "cudaErrorLaunchTimeout";
    case cudaErrorAssert: return "cudaErrorAssert";
    case cudaErrorIllegalInstruction: return "cudaErrorIllegalInstruction";
    case cudaErrorLaunchFailure: return "cudaErrorLaunchFailure";
    case cudaErrorMisalignedAddress: return "cudaErrorMisalignedAddress";
    case cudaErrorNotSupported: return "cudaErrorNotSupported";
    default: return "cudaErrorUnknown";
  }
}

static const char* error_text(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorMemoryAllocation: return "out of memory";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorInvalidDeviceFunction: return "invalid device function";
    case cudaErrorNoDevice: return "no CUDA-capable device is detected";
    case cudaErrorIllegalAddress: return "an illegal memory access was encountered";
    case cudaErrorLaunchOutOfResources: return "too many resources requested for launch";
    case cudaErrorLaunchTimeout: return "the launch timed out and was terminated";
    case cudaErrorAssert: return "device-side assert triggered";
    case cudaErrorIllegalInstruction: return "an illegal instruction was encountered";
    case cudaErrorLaunchFailure: return "unspecified launch failure";
    case cudaErrorMisalignedAddress: return "misaligned address";
    case cudaErrorNotSupported: return "operation not supported";
    default: return "unknown error";
  }
}

extern "C" {

cudaError_t cudaGetLastError(void) {
  cudaError_t e = t_last_error;
  t_last_error = cudaSuccess;
  return e;
}

cudaError_t cudaPeekAtLastError(void) { return t_last_error; }

// The detailed message of this thread's latest launch error when `e` is its
// code, CUDA's generic text otherwise.
const char* cudaGetErrorString(cudaError_t e) {
  if (e != cudaSuccess && e == t_msg_code && t_msg[0]) return t_msg;
  return error_text(e);
}

const char* cudaGetErrorName(cudaError_t e) { return error_name(e); }

cudaError_t cudaDeviceSynchronize(void) { return cudaSuccess; }
cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }

cudaError_t cudaMemsetAsync(void* ptr, int value, size_t count, cudaStream_t) {
  if (count && !ptr) return t_last_error = cudaErrorInvalidValue;
  if (count) memset(ptr, value, count);
  return cudaSuccess;
}
cudaError_t cudaMemset(void* ptr, int value, size_t count) { return cudaMemsetAsync(ptr, value, count, nullptr); }

cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t count, enum cudaMemcpyKind, cudaStream_t) {
  if (count && (!dst || !src)) return t_last_error = cudaErrorInvalidValue;
  if (count) memmove(dst, src, count);
  return cudaSuccess;
}
cudaError_t cudaMemcpy(void* dst, const void* src, size_t count, enum cudaMemcpyKind kind) {
  return cudaMemcpyAsync(dst, src, count, kind, nullptr);
}

cudaError_t cudaMalloc(void** ptr, size_t size) {
  if (!ptr) return t_last_error = cudaErrorInvalidValue;
  if (posix_memalign(ptr, 256, size ? size : 1) != 0) {
    *ptr = nullptr;
    return t_last_error = cudaErrorMemoryAllocation;
  }
  return cudaSuccess;
}
cudaError_t cudaMallocAsync(void** ptr, size_t size, cudaStream_t) { return cudaMalloc(ptr, size); }
cudaError_t cudaFree(void* ptr) {
  free(ptr);
  return cudaSuccess;
}
cudaError_t cudaFreeAsync(void* ptr, cudaStream_t) { return cudaFree(ptr); }

cudaError_t cudaGetDevice(int* device) {
  if (device) *device = 0;
  return cudaSuccess;
}
cudaError_t cudaSetDevice(int device) { return device == 0 ? cudaSuccess : (t_last_error = cudaErrorInvalidValue); }
cudaError_t cudaGetDeviceCount(int* count) {
  if (count) *count = 1;
  return cudaSuccess;
}

// An H100-like device; SIMT_SM_COUNT sets the multiprocessor count.
cudaError_t cudaDeviceGetAttribute(int* value, enum cudaDeviceAttr attr, int device) {
  if (!value || device != 0) return t_last_error = cudaErrorInvalidValue;
  switch (attr) {
    case cudaDevAttrMaxThreadsPerBlock: *value = 1024; break;
    case cudaDevAttrMaxBlockDimX: *value = 1024; break;
    case cudaDevAttrMaxGridDimX: *value = 2147483647; break;
    case cudaDevAttrMaxGridDimY: *value = 65535; break;
    case cudaDevAttrMaxSharedMemoryPerBlock: *value = 48 * 1024; break;
    case cudaDevAttrWarpSize: *value = 32; break;
    case cudaDevAttrMultiProcessorCount:
      *value = static_cast<int>(simt::detail::env_unsigned("SIMT_SM_COUNT", 132, 1, 4096));
      break;
    case cudaDevAttrMaxThreadsPerMultiProcessor: *value = 2048; break;
    case cudaDevAttrComputeCapabilityMajor: *value = 9; break;
    case cudaDevAttrComputeCapabilityMinor: *value = 0; break;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = 227 * 1024; break;
    default: return t_last_error = cudaErrorInvalidValue;
  }
  return cudaSuccess;
}

// assert() in a kernel compiled into the same library lands here (the symbol
// is hidden, so only this library's calls bind to it): the block ends with
// cudaErrorAssert. Outside a kernel it behaves like glibc's.
void __assert_fail(const char* assertion, const char* file, unsigned int line, const char* function) noexcept {
  if (simt::detail::Fiber* f = simt::detail::tls.cur)
    simt::detail::fiber_fail(f, cudaErrorAssert, "assertion `%s' failed at %s:%u in %s", assertion, file, line,
                             function);
  fprintf(stderr, "%s:%u: %s: Assertion `%s' failed.\n", file, line, function, assertion);
  abort();
}

#if !SIMT_RT_ASAN
// The plain and TSan builds compile the kernels with -fsanitize=alignment and
// no UBSan runtime (tests/simt/build.py): a load or store through a misaligned
// pointer (a uint4 / float4 / double2 vector off its 16-byte grid, a float off
// 4 bytes) calls these, and the block ends with cudaErrorMisalignedAddress, as
// on a GPU. (The ASan build links UBSan's own runtime and aborts there.)
struct simt_ubsan_loc {
  const char* file;
  uint32_t line, column;
};
struct simt_ubsan_type {
  uint16_t kind, info;
  char name[1];
};
struct simt_ubsan_mismatch {
  simt_ubsan_loc loc;
  const simt_ubsan_type* type;
  unsigned char log_align, check_kind;
};

static void simt_ubsan_mismatch_report(const simt_ubsan_mismatch* d, uintptr_t p) {
  static const char* const kinds[] = {"load", "store", "reference binding", "member access", "member call",
                                      "constructor call", "downcast", "downcast", "upcast", "cast to virtual base"};
  const char* kind = d->check_kind < sizeof kinds / sizeof kinds[0] ? kinds[d->check_kind] : "access";
  char what[256];
  snprintf(what, sizeof what, "%s of %s", kind, d->type ? d->type->name : "?");
  const unsigned align = 1u << d->log_align;
  if (p == 0) {
    if (simt::detail::Fiber* f = simt::detail::tls.cur)
      simt::detail::fiber_fail(f, cudaErrorIllegalAddress, "null pointer: %s at %s:%u", what, d->loc.file,
                               d->loc.line);
    fprintf(stderr, "simt: null pointer: %s at %s:%u\n", what, d->loc.file, d->loc.line);
    abort();
  }
  simt::detail::misaligned(reinterpret_cast<const void*>(p), align, what, align, d->loc.file,
                           static_cast<int>(d->loc.line));
}

void __ubsan_handle_type_mismatch_v1(simt_ubsan_mismatch* d, uintptr_t p) { simt_ubsan_mismatch_report(d, p); }
void __ubsan_handle_type_mismatch_v1_abort(simt_ubsan_mismatch* d, uintptr_t p) { simt_ubsan_mismatch_report(d, p); }
#endif

}  // extern "C"

#pragma GCC visibility pop
