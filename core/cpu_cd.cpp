// One CD-k / PCD-k step of a Bernoulli RBM on the CPU, for binary visible states, with its minibatch
// cut into PARTS blocks of rows that run side by side. rbm_study/core/cpu_cd.py builds this file with
// torch's C++ extension API and says why it exists; the maths is core/train.py's:
//
//     ph0 = p(h|v0);  h ~ ph0;  k times: v ~ p(v|h), ph = p(h|v), h ~ ph  (vk, phk: the last v, ph)
//     target <- beta target + scale (v0' ph0 - vk' phk)   for W, and likewise for a and b
//
// Every product with a binary matrix is a sum of the rows its ones pick (row n of v W sums the
// rows i of W where v[n, i] = 1, row n of h W' the rows j of W' where h[n, j] = 1), so the step
// needs no matrix multiply at all. A step runs three phases, each split PARTS ways, with a
// barrier between them: W' from W (by hidden unit), the chain (by rows of the minibatch), the
// update (by visible unit, the hidden bias by hidden unit). Each part draws its samples from its
// own SFC64 lanes, and every sum runs in a fixed order, so the result does not depend on how
// many threads run the parts: one runs them in turn, two run them at once.

#include <torch/extension.h>

#ifdef __AVX512F__
#include <immintrin.h>
#endif

#include <algorithm>
#include <atomic>
#include <bit>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <exception>
#include <functional>
#include <mutex>
#include <pthread.h>
#include <thread>
#include <utility>
#include <vector>

namespace {

constexpr int64_t PARTS = 2;
constexpr int64_t LANES = 64;       // as rbm_study.core.kernels.LANES
constexpr int64_t BLOCK_ROWS = 16;  // as rbm_study.core.kernels.BLOCK_ROWS

// ---------------------------------------------------------------------------------------------
// Bernoulli samples, exactly as rbm_study.core.kernels.bernoulli makes them (the tests check it)

struct Lanes {  // a [4, LANES] uint64 state: a, b, c, counter of LANES SFC64 generators
  uint64_t* __restrict__ a;
  uint64_t* __restrict__ b;
  uint64_t* __restrict__ c;
  uint64_t* __restrict__ counter;
  explicit Lanes(uint64_t* s) : a(s), b(s + LANES), c(s + 2 * LANES), counter(s + 3 * LANES) {}
};

void sfc64_fill(Lanes s, uint64_t* __restrict__ out, int64_t rows) {
  for (int64_t k = 0; k < rows; ++k) {
    for (int64_t l = 0; l < LANES; ++l) {
      const uint64_t tmp = s.a[l] + s.b[l] + s.counter[l];
      s.counter[l] += 1;
      s.a[l] = s.b[l] ^ (s.b[l] >> 11);
      const uint64_t c = s.c[l];
      s.b[l] = c + (c << 3);
      s.c[l] = ((c << 24) | (c >> 40)) + tmp;
      out[k * LANES + l] = tmp;
    }
  }
}

// out[i] = 1 if (s_i + 0.5) / 65536 < p[i] else 0, s_i the 16-bit quarters of fresh SFC64 words;
// with `threshold`, out[i] = p[i] > 0.5 (the tests' deterministic chain). Returns sum (p - v)^2
// where v is given.
double bernoulli(const float* __restrict__ p, float* __restrict__ out, int64_t n, Lanes lanes, bool threshold,
                 const float* __restrict__ v = nullptr) {
  alignas(64) uint64_t words[BLOCK_ROWS * LANES];
  const int64_t block = 4 * LANES * BLOCK_ROWS;
  double total = 0.0;
  for (int64_t start = 0; start < n; start += block) {
    const int64_t m = std::min(block, n - start);
    const float* pp = p + start;
    float* oo = out + start;
    if (threshold) {
      for (int64_t i = 0; i < m; ++i) oo[i] = pp[i] > 0.5f ? 1.0f : 0.0f;
    } else {
      sfc64_fill(lanes, words, (m + 4 * LANES - 1) / (4 * LANES));
      uint16_t bits[BLOCK_ROWS * LANES * 4];
      std::memcpy(bits, words, sizeof(uint16_t) * m);
      for (int64_t i = 0; i < m; ++i) {
        oo[i] = ((static_cast<float>(bits[i]) + 0.5f) * (1.0f / 65536.0f) < pp[i]) ? 1.0f : 0.0f;
      }
    }
    if (v != nullptr) {
      const float* vv = v + start;
      for (int64_t i = 0; i < m; ++i) {
        const double d = static_cast<double>(pp[i]) - static_cast<double>(vv[i]);
        total += d * d;
      }
    }
  }
  return total;
}

// ---------------------------------------------------------------------------------------------
// The logistic function, vectorised: exp by Cody-Waite range reduction and Cephes' polynomial for
// expf (relative error about 2e-7, as libm's), so the loop runs in vector registers

inline float exp_reduced(float x) {
  x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);  // NaN stays NaN
  // n = x / ln 2 rounded to the nearest integer, by adding and subtracting 1.5 * 2^23 (std::floor
  // would keep the loop out of vector registers)
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;  // x - n ln 2, ln 2 in two parts
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;  // 2^n, n in [-126, 127]
  return p * std::bit_cast<float>(bits);
}

void sigmoid(float* __restrict__ x, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) x[i] = 1.0f / (1.0f + exp_reduced(-x[i]));
}

// ---------------------------------------------------------------------------------------------
// Binary matrices as lists of their ones, and products with them as sums of rows

constexpr int64_t VEC = 16;    // floats in a 512-bit vector: summed matrices' rows are padded to a multiple
constexpr int64_t BLOCK = 64;  // columns summed at a time, their running sums held in registers

int64_t padded(int64_t width) { return (width + VEC - 1) / VEC * VEC; }

struct Ones {  // where the ones of a binary [rows, width] matrix are, row by row (or column by column)
  std::vector<int32_t> index;
  std::vector<int32_t> starts;
};

// Lists the ones of x [rows, width] (rows ld floats apart); false where an entry is neither 0 nor 1
// (nothing to sum then). Sixteen entries at a time where the CPU has AVX-512: a comparison gives
// the mask of the ones, and their column numbers are packed to the front of a register (in-register
// compress: the form that stores straight to memory is slow on some CPUs) and written whole, the
// position moving on by the count. Elsewhere one entry at a time, without a branch: the column is
// written unconditionally and the position moves on only past a one.
bool list_ones(const float* __restrict__ x, int64_t rows, int64_t width, int64_t ld, Ones& ones) {
  ones.index.resize(static_cast<size_t>(rows * width + VEC));  // room for a last whole register
  ones.starts.resize(static_cast<size_t>(rows + 1));
  int32_t* __restrict__ index = ones.index.data();
  int64_t count = 0;
  uint32_t other = 0;  // bits set where an entry was neither 0.0f nor 1.0f
#ifdef __AVX512F__
  const __m512 one = _mm512_set1_ps(1.0f);
  const __m512i not_one = _mm512_set1_epi32(static_cast<int32_t>(~0x3F800000u));
  const __m512i step = _mm512_set1_epi32(VEC);
  __m512i others = _mm512_setzero_si512();
#endif
  for (int64_t r = 0; r < rows; ++r) {
    ones.starts[r] = static_cast<int32_t>(count);
    const float* row = x + r * ld;
    int64_t i = 0;
#ifdef __AVX512F__
    __m512i columns = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    for (; i < width; i += VEC) {
      const __mmask16 valid = i + VEC <= width ? __mmask16(0xFFFF) : __mmask16((1u << (width - i)) - 1);
      const __m512 values = _mm512_maskz_loadu_ps(valid, row + i);
      const __mmask16 is_one = _mm512_cmpeq_ps_mask(values, one);
      others = _mm512_or_si512(others, _mm512_and_si512(_mm512_castps_si512(values), not_one));
      _mm512_storeu_si512(index + count, _mm512_maskz_compress_epi32(is_one, columns));
      count += __builtin_popcount(is_one);
      columns = _mm512_add_epi32(columns, step);
    }
#endif
    for (; i < width; ++i) {
      const uint32_t bits = std::bit_cast<uint32_t>(row[i]);
      index[count] = static_cast<int32_t>(i);
      count += bits == 0x3F800000u;
      other |= bits & ~0x3F800000u;
    }
  }
  ones.starts[rows] = static_cast<int32_t>(count);
#ifdef __AVX512F__
  other |= static_cast<uint32_t>(_mm512_reduce_or_epi32(others));
#endif
  return other == 0;
}

// The same ones listed by column: for each column i, the rows (numbered from `first_row`) with a one.
void by_column(const Ones& by_row, int64_t rows, int64_t width, int64_t first_row, Ones& by_col) {
  by_col.starts.assign(static_cast<size_t>(width + 1), 0);
  const int32_t total = by_row.starts[rows];
  for (int32_t e = 0; e < total; ++e) by_col.starts[by_row.index[e] + 1] += 1;
  for (int64_t i = 0; i < width; ++i) by_col.starts[i + 1] += by_col.starts[i];
  by_col.index.resize(static_cast<size_t>(total));
  std::vector<int32_t> fill(by_col.starts.begin(), by_col.starts.end() - 1);
  for (int64_t r = 0; r < rows; ++r) {
    for (int32_t e = by_row.starts[r]; e < by_row.starts[r + 1]; ++e) {
      by_col.index[fill[by_row.index[e]]++] = static_cast<int32_t>(first_row + r);
    }
  }
}

// sums[0:span) = the sum of the rows M[i, 0:span) for the i in the given lists, in order; M's rows
// are ld floats apart, span is a multiple of VEC, and the memory past the last row is readable up to
// span. Each block of columns is summed in registers.
struct Rows {
  const int32_t* index;
  int64_t count;
};

// VEC floats as one value (GCC's and Clang's vector extension): written this way, the running sums
// stay in registers (left to itself, the compiler vectorised across the rows instead, with gathers)
typedef float Floats __attribute__((vector_size(VEC * sizeof(float))));

template <int64_t WIDTH>
inline void sum_block(const float* __restrict__ M, int64_t ld, int64_t k0, const Rows* lists, int64_t n_lists,
                      float* __restrict__ sums) {
  constexpr int64_t n_vec = WIDTH / VEC;
  Floats acc[n_vec] = {};
  for (int64_t q = 0; q < n_lists; ++q) {
    for (int64_t e = 0; e < lists[q].count; ++e) {
      const float* __restrict__ m = M + static_cast<int64_t>(lists[q].index[e]) * ld + k0;
      for (int64_t v = 0; v < n_vec; ++v) {
        Floats x;
        std::memcpy(&x, m + v * VEC, sizeof(x));
        acc[v] += x;
      }
    }
  }
  std::memcpy(sums + k0, acc, sizeof(acc));
}

void sum_rows(const float* __restrict__ M, int64_t ld, int64_t span, const Rows* lists, int64_t n_lists,
              float* __restrict__ sums) {
  int64_t k0 = 0;
  for (; k0 + BLOCK <= span; k0 += BLOCK) sum_block<BLOCK>(M, ld, k0, lists, n_lists, sums);
  for (; k0 < span; k0 += VEC) sum_block<VEC>(M, ld, k0, lists, n_lists, sums);
}

// out[r, 0:width) = sigmoid(bias + the sum of the rows of M that row r's ones pick), for the rows
// of `ones` (out's rows out_ld apart); M [*, ld] with ld = padded(width). Column block by column
// block, all rows for each: the block of M's columns is then read from the fastest cache, row after
// row (W' is 313 KB for 784-100, more than that cache, but a block of 64 of its columns is 26 KB).
template <int64_t WIDTH>
void conditional_block(const Ones& ones, int64_t rows, const float* __restrict__ M, int64_t k0, int64_t width,
                       const float* __restrict__ bias, float* __restrict__ out, int64_t out_ld) {
  const int64_t ld = padded(width), stop = std::min(k0 + WIDTH, width);
  alignas(64) float sums[WIDTH];
  for (int64_t r = 0; r < rows; ++r) {
    const Rows list{ones.index.data() + ones.starts[r], ones.starts[r + 1] - ones.starts[r]};
    sum_block<WIDTH>(M, ld, k0, &list, 1, sums - k0);
    float* __restrict__ o = out + r * out_ld;
    for (int64_t k = k0; k < stop; ++k) o[k] = bias[k] + sums[k - k0];
  }
}

void conditional(const Ones& ones, int64_t rows, const float* __restrict__ M, int64_t width,
                 const float* __restrict__ bias, float* __restrict__ out, int64_t out_ld) {
  const int64_t ld = padded(width);
  int64_t k0 = 0;
  for (; k0 + BLOCK <= ld; k0 += BLOCK) conditional_block<BLOCK>(ones, rows, M, k0, width, bias, out, out_ld);
  for (; k0 < ld; k0 += VEC) conditional_block<VEC>(ones, rows, M, k0, width, bias, out, out_ld);
  sigmoid(out, rows * out_ld);  // the padding too, if any: sums of nothing, never read
}

// ---------------------------------------------------------------------------------------------
// PARTS-way teams: the calling thread runs part 0, one worker thread each of the others

// A job in phases: job(part, phase) for every part of a phase before any part of the next, and
// after each phase `proceed()` says whether to go on. A part that throws (std::bad_alloc from a
// list's resize) stops the job (on two threads after that phase), and `run` raises it on the
// calling thread: an exception must not leave a worker's thread (that terminates the process) nor
// leave `run` while a worker still uses the job's buffers.
using Job = std::function<void(int64_t part, int64_t phase)>;
using Proceed = std::function<bool()>;

class Team {
 public:
  // Runs the job's phases on `threads` threads (1: every part on the caller, in turn).
  void run(int64_t threads, int64_t phases, const Job& job, const Proceed& proceed) {
    std::unique_lock<std::mutex> lock(busy_, std::try_to_lock);
    if (threads < 2 || !lock.owns_lock()) {  // one thread, or another trainer has the team now
      for (int64_t phase = 0; phase < phases; ++phase) {
        for (int64_t part = 0; part < PARTS; ++part) job(part, phase);
        if (!proceed()) return;
      }
      return;
    }
    start_workers();
    resting_.store(false, std::memory_order_relaxed);
    job_ = &job;
    proceed_ = &proceed;
    phases_ = phases;
    failure_ = nullptr;
    for (auto& w : workers_) w->done.store(false, std::memory_order_relaxed);
    generation_.fetch_add(1, std::memory_order_release);
    generation_.notify_all();
    phases_of(0);
    for (auto& w : workers_) wait_until([&] { return w->done.load(std::memory_order_acquire); });
    if (failure_) std::rethrow_exception(std::exchange(failure_, nullptr));
  }

  // The steps to come run on one thread (or none come): the workers sleep now rather than spin, so
  // that a worker that shares a core with the caller does not slow it down.
  void rest() { resting_.store(true, std::memory_order_relaxed); }

 private:
  struct Worker {
    std::atomic<bool> done{true};
  };

  static void pause() {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();  // tells the core this is a spin loop
#endif
  }

  // Spins briefly (the other part is usually a few microseconds away), then yields the core: on
  // a machine whose other core is busy, the thread we wait for may need ours to run at all.
  template <class Ready>
  static void wait_until(Ready ready) {
    for (int spin = 0; !ready(); ++spin) {
      if (spin < 4000) {
        pause();
      } else {
        std::this_thread::yield();
      }
    }
  }

  void phases_of(int64_t part) {
    for (int64_t phase = 0; phase < phases_; ++phase) {
      try {
        (*job_)(part, phase);
      } catch (...) {  // kept for `run` to rethrow; every part still meets at the barrier
        std::lock_guard<std::mutex> first(failure_lock_);
        if (!failure_) failure_ = std::current_exception();
      }
      if (!barrier()) return;
    }
  }

  // Waits until every part has finished the phase (a sense-reversing barrier) and says whether the
  // job goes on. The last part to arrive decides it for all, while every other part waits: a part
  // that looked for itself after the barrier could see the next phase's failure already, leave
  // early, and leave the others waiting at a barrier it never reaches.
  bool barrier() {
    const uint64_t sense = barrier_generation_.load(std::memory_order_acquire);
    if (arrived_.fetch_add(1, std::memory_order_acq_rel) + 1 == PARTS) {
      arrived_.store(0, std::memory_order_relaxed);
      go_on_ = !failure_ && (*proceed_)();
      barrier_generation_.fetch_add(1, std::memory_order_release);
    } else {
      wait_until([&] { return barrier_generation_.load(std::memory_order_acquire) != sense; });
    }
    return go_on_;  // the next barrier's decision needs every part there, this one's read included
  }

  void start_workers() {
    if (!workers_.empty()) return;
    for (int64_t part = 1; part < PARTS; ++part) {
      workers_.push_back(std::make_unique<Worker>());
      Worker* worker = workers_.back().get();
      // detached: the process may exit while a worker sleeps; the team is never destroyed
      std::thread([this, worker, part] { work(worker, part); }).detach();
    }
  }

  void work(Worker* worker, int64_t part) {
    uint64_t seen = 0;
    for (;;) {
      // between steps, spin for up to IDLE_SPIN (in training the next step comes within tens of
      // microseconds, and waking a sleeping thread can cost as much on a virtual machine), then
      // sleep until woken, so that a finished training leaves no core busy
      const auto idle_since = std::chrono::steady_clock::now();
      for (int spin = 1; generation_.load(std::memory_order_acquire) == seen; ++spin) {
        pause();
        if (resting_.load(std::memory_order_relaxed) ||
            (spin % 256 == 0 && std::chrono::steady_clock::now() - idle_since > IDLE_SPIN)) {
          generation_.wait(seen, std::memory_order_acquire);
        }
      }
      seen = generation_.load(std::memory_order_acquire);
      phases_of(part);
      worker->done.store(true, std::memory_order_release);
    }
  }

  static constexpr std::chrono::microseconds IDLE_SPIN{2000};

  std::mutex busy_;
  std::vector<std::unique_ptr<Worker>> workers_;
  std::atomic<uint64_t> generation_{0};
  std::atomic<bool> resting_{false};
  std::atomic<int64_t> arrived_{0};
  std::atomic<uint64_t> barrier_generation_{0};
  const Job* job_ = nullptr;
  const Proceed* proceed_ = nullptr;
  int64_t phases_ = 0;
  bool go_on_ = true;  // the last barrier's decision: written by its last part, read after it
  std::mutex failure_lock_;
  std::exception_ptr failure_;  // the first part's exception of this run
};

Team*& shared_team() {
  static Team* shared = new Team();  // never destroyed: its workers are detached
  return shared;
}

// The process's team. A child made by fork() has none of its parent's worker threads, so it starts
// with a team of its own (the parent's is left behind, as it was).
Team& team() {
  static std::once_flag registered;
  std::call_once(registered, [] { pthread_atfork(nullptr, nullptr, [] { shared_team() = new Team(); }); });
  return *shared_team();
}

int64_t first_of(int64_t part, int64_t size) { return size * part / PARTS; }

// A step's buffers, kept from step to step (one set per calling thread): W and W' with padded
// rows, for the sums of rows (the padding stays zero); ph0 and phk stacked; the latest hidden
// sample and p(v|h); the lists of ones of each part
struct Workspace {
  int64_t N = -1, V = -1, H = -1;
  at::Tensor Wp, WTp, ph, h, pv;  // torch's CPU allocator aligns them to 64 bytes, as padded rows need
  std::vector<Ones> data_ones = std::vector<Ones>(PARTS), chain_ones = std::vector<Ones>(PARTS);
  std::vector<Ones> hidden_ones = std::vector<Ones>(PARTS);
  std::vector<Ones> data_cols = std::vector<Ones>(PARTS), chain_cols = std::vector<Ones>(PARTS);  // by column

  void fit(int64_t n, int64_t v, int64_t h_) {
    if (n == N && v == V && h_ == H) return;
    N = n, V = v, H = h_;
    Wp = at::zeros({V * padded(H)}, at::kFloat);
    WTp = at::zeros({H * padded(V)}, at::kFloat);
    ph = at::zeros({2 * N * padded(H)}, at::kFloat);
    h = at::zeros({N * padded(H)}, at::kFloat);
    pv = at::zeros({N * V}, at::kFloat);
  }
};

Workspace& workspace() {
  thread_local Workspace w;
  return w;
}

}  // namespace

// One CD-k step (PCD-k with `chain`): v0 [N, V] binary; W [V, H], a [V], b [H] the parameters;
// W_to, a_to, b_to the targets of the update (the parameters themselves, or the velocities),
// scaled by beta (W_to) and bias_beta (a_to, b_to) before the step is added; lanes
// [PARTS, 4, LANES] uint64 the samplers' states. Returns (vk, the summed squared error of the
// reconstruction), or an empty list where v0 or the chain is not binary (nothing changed then).
std::vector<at::Tensor> cd_step(const at::Tensor& v0, const at::Tensor& W, const at::Tensor& a, const at::Tensor& b,
                                const at::Tensor& W_to, const at::Tensor& a_to, const at::Tensor& b_to,
                                const at::Tensor& lanes, int64_t k, const c10::optional<at::Tensor>& chain,
                                double beta, double bias_beta, double scale, int64_t threads, bool threshold) {
  for (const at::Tensor* t : {&v0, &W, &a, &b, &W_to, &a_to, &b_to}) {
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat && t->is_contiguous(),
                "cpu_cd: tensors must be contiguous float32 CPU tensors");
  }
  TORCH_CHECK(lanes.scalar_type() == at::kUInt64 && lanes.is_contiguous() && lanes.numel() == PARTS * 4 * LANES,
              "cpu_cd: lanes must be [", PARTS, ", 4, ", LANES, "] uint64");
  TORCH_CHECK(k >= 1, "cpu_cd: k must be at least 1");
  const int64_t N = v0.size(0), V = W.size(0), H = W.size(1);
  TORCH_CHECK(v0.dim() == 2 && v0.size(1) == V, "cpu_cd: v0 must be [N, ", V, "]");
  const bool persistent = chain.has_value();
  if (persistent) TORCH_CHECK(chain->sizes() == v0.sizes() && chain->is_contiguous(), "cpu_cd: chain must be like v0");
  const int64_t Vp = padded(V), Hp = padded(H);

  Workspace& ws = workspace();
  ws.fit(N, V, H);
  float* Wp = ws.Wp.data_ptr<float>();
  float* WTp = ws.WTp.data_ptr<float>();
  float* ph = ws.ph.data_ptr<float>();  // ph0 rows :N, phk rows N:, Hp floats apart
  std::vector<Ones>& data_ones = ws.data_ones;
  std::vector<Ones>& chain_ones = ws.chain_ones;
  std::vector<Ones>& hidden_ones = ws.hidden_ones;
  std::vector<Ones>& data_cols = ws.data_cols;
  std::vector<Ones>& chain_cols = ws.chain_cols;
  at::Tensor vk = at::empty({N, V}, W.options());  // a new tensor: it outlives the step (the PCD chain)
  std::vector<double> squared_error(PARTS, 0.0);
  std::vector<uint8_t> binary(PARTS, 1);

  const float* v0_ = v0.data_ptr<float>();
  const float* W_ = W.data_ptr<float>();
  const float* a_ = a.data_ptr<float>();
  const float* b_ = b.data_ptr<float>();
  const float* chain_ = persistent ? chain->data_ptr<float>() : nullptr;
  float* h_ = ws.h.data_ptr<float>();  // Hp floats a row
  float* pv_ = ws.pv.data_ptr<float>();
  float* vk_ = vk.data_ptr<float>();
  float* W_to_ = W_to.data_ptr<float>();
  float* a_to_ = a_to.data_ptr<float>();
  float* b_to_ = b_to.data_ptr<float>();
  uint64_t* lanes_ = lanes.data_ptr<uint64_t>();
  const float beta_ = static_cast<float>(beta), bias_beta_ = static_cast<float>(bias_beta);
  const float scale_ = static_cast<float>(scale);

  auto copy_and_list = [&](int64_t part) {
    // W padded (by visible unit) and W' padded (by hidden unit); the lists of the data's and the
    // chain's ones, by rows: if either is not binary, every part learns it after this phase
    for (int64_t i = first_of(part, V); i < first_of(part + 1, V); ++i) {
      std::memcpy(Wp + i * Hp, W_ + i * H, sizeof(float) * H);
    }
    const int64_t j0 = first_of(part, H), j1 = first_of(part + 1, H);
    for (int64_t i0 = 0; i0 < V; i0 += VEC) {  // in tiles: the tile's rows of W stay in cache
      const int64_t i1 = std::min(i0 + VEC, V);
      for (int64_t j = j0; j < j1; ++j) {
        for (int64_t i = i0; i < i1; ++i) WTp[j * Vp + i] = W_[i * H + j];
      }
    }
    const int64_t r0 = first_of(part, N), n = first_of(part + 1, N) - r0;
    binary[part] = list_ones(v0_ + r0 * V, n, V, V, data_ones[part]);
    if (persistent) binary[part] &= list_ones(chain_ + r0 * V, n, V, V, chain_ones[part]);
  };

  auto chain_of_rows = [&](int64_t part) {
    const int64_t r0 = first_of(part, N), n = first_of(part + 1, N) - r0;
    Lanes own(lanes_ + part * 4 * LANES);
    float* ph0 = ph + r0 * Hp;
    float* phk = ph + (N + r0) * Hp;
    float* hp = h_ + r0 * Hp;
    float* pvp = pv_ + r0 * V;
    float* vkp = vk_ + r0 * V;
    const float* v0p = v0_ + r0 * V;
    auto p_h = [&](const Ones& ones, float* out) { conditional(ones, n, Wp, H, b_, out, Hp); };
    auto sample_hidden = [&](const float* p_hidden) {  // h ~ p_hidden, then pv = p(v|h)
      bernoulli(p_hidden, hp, n * Hp, own, threshold);  // the padding's samples are never read
      list_ones(hp, n, H, Hp, hidden_ones[part]);
      conditional(hidden_ones[part], n, WTp, V, a_, pvp, V);
    };
    p_h(data_ones[part], ph0);
    sample_hidden(ph0);  // the reconstruction
    if (persistent) {  // the chain goes on from its last state
      for (int64_t i = 0; i < n * V; ++i) {
        const double d = static_cast<double>(pvp[i]) - static_cast<double>(v0p[i]);
        squared_error[part] += d * d;
      }
      p_h(chain_ones[part], phk);
      sample_hidden(phk);
      bernoulli(pvp, vkp, n * V, own, threshold);
    } else {  // the reconstruction is also the first Gibbs step's p(v|h)
      squared_error[part] = bernoulli(pvp, vkp, n * V, own, threshold, v0p);
    }
    for (int64_t step = 0; step < k; ++step) {
      list_ones(vkp, n, V, V, chain_ones[part]);
      p_h(chain_ones[part], phk);
      if (step + 1 < k) {  // the update uses phk: a hidden sample after the last step is waste
        sample_hidden(phk);
        bernoulli(pvp, vkp, n * V, own, threshold);
      }
    }
    // the update goes by visible unit: which rows have a one there, for both sides
    by_column(data_ones[part], n, V, r0, data_cols[part]);
    by_column(chain_ones[part], n, V, N + r0, chain_cols[part]);
  };

  auto update = [&](int64_t part) {
    // rows [i0, i1) of W_to and a_to: W_to[i] <- beta W_to[i] + scale (the sum of ph0's rows over
    // the data's ones in column i - the sum of phk's over the chain's), the parts' rows in order;
    // a block of columns at a time, as in `conditional`. Then the hidden bias, by hidden unit.
    const int64_t i0 = first_of(part, V), i1 = first_of(part + 1, V);
    constexpr int64_t UPDATE_BLOCK = 32;  // ph's 200 rows of a block of 32 columns: 26 KB
    alignas(64) float data_sum[UPDATE_BLOCK], chain_sum[UPDATE_BLOCK];
    Rows data_rows[PARTS], chain_rows[PARTS];
    for (int64_t k0 = 0; k0 < H; k0 += UPDATE_BLOCK) {
      const int64_t stop = std::min(k0 + UPDATE_BLOCK, H);
      for (int64_t i = i0; i < i1; ++i) {
        for (int64_t q = 0; q < PARTS; ++q) {
          const Ones& d = data_cols[q];
          const Ones& c = chain_cols[q];
          data_rows[q] = {d.index.data() + d.starts[i], d.starts[i + 1] - d.starts[i]};
          chain_rows[q] = {c.index.data() + c.starts[i], c.starts[i + 1] - c.starts[i]};
        }
        sum_block<UPDATE_BLOCK>(ph, Hp, k0, data_rows, PARTS, data_sum - k0);
        sum_block<UPDATE_BLOCK>(ph, Hp, k0, chain_rows, PARTS, chain_sum - k0);
        float* __restrict__ t = W_to_ + i * H;
        for (int64_t j = k0; j < stop; ++j) {
          t[j] = beta_ * t[j] + (scale_ * data_sum[j - k0] - scale_ * chain_sum[j - k0]);
        }
      }
    }
    for (int64_t i = i0; i < i1; ++i) {
      int64_t net_ones = 0;  // the visible bias's step over scale
      for (int64_t q = 0; q < PARTS; ++q) {
        net_ones += (data_cols[q].starts[i + 1] - data_cols[q].starts[i]) -
                    (chain_cols[q].starts[i + 1] - chain_cols[q].starts[i]);
      }
      a_to_[i] = bias_beta_ * a_to_[i] + scale_ * static_cast<float>(net_ones);
    }
    const int64_t j0 = first_of(part, H), j1 = first_of(part + 1, H);
    std::vector<float> sum0(static_cast<size_t>(j1 - j0), 0.0f), sumk(static_cast<size_t>(j1 - j0), 0.0f);
    for (int64_t r = 0; r < N; ++r) {
      const float* __restrict__ p0 = ph + r * Hp + j0;
      const float* __restrict__ pk = ph + (N + r) * Hp + j0;
      for (int64_t j = 0; j < j1 - j0; ++j) {
        sum0[j] += p0[j];
        sumk[j] += pk[j];
      }
    }
    for (int64_t j = j0; j < j1; ++j) {
      b_to_[j] = bias_beta_ * b_to_[j] + (scale_ * sum0[j - j0] - scale_ * sumk[j - j0]);
    }
  };

  const Job job = [&](int64_t part, int64_t phase) {
    if (phase == 0) copy_and_list(part);
    if (phase == 1) chain_of_rows(part);
    if (phase == 2) update(part);
  };
  const Proceed all_binary = [&] {
    return std::all_of(binary.begin(), binary.end(), [](uint8_t x) { return x != 0; });
  };
  {
    pybind11::gil_scoped_release no_gil;
    team().run(threads, 3, job, all_binary);
  }
  if (!all_binary()) return {};
  double total = 0.0;
  for (double e : squared_error) total += e;
  return {vk, at::scalar_tensor(total, at::kDouble)};
}

// The step's sampler on its own, for the tests: samples of p [n] float32 from lanes [4, LANES].
at::Tensor bernoulli_samples(const at::Tensor& p, const at::Tensor& lanes) {
  TORCH_CHECK(p.scalar_type() == at::kFloat && p.is_contiguous() && p.dim() == 1, "cpu_cd: p must be [n] float32");
  TORCH_CHECK(lanes.scalar_type() == at::kUInt64 && lanes.is_contiguous() && lanes.numel() == 4 * LANES,
              "cpu_cd: lanes must be [4, ", LANES, "] uint64");
  at::Tensor out = at::empty_like(p);
  bernoulli(p.data_ptr<float>(), out.data_ptr<float>(), p.numel(), Lanes(lanes.data_ptr<uint64_t>()), false);
  return out;
}

// The team on its own, for the tests: a job of `phases` phases on `threads` threads whose part
// `failing` throws std::bad_alloc in phase `failing_phase`. Returns the (part, phase) pairs that
// ran, in phase order, or raises the part's MemoryError.
std::vector<std::pair<int64_t, int64_t>> team_trial(int64_t threads, int64_t phases, int64_t failing,
                                                    int64_t failing_phase) {
  std::vector<std::vector<int64_t>> ran(PARTS);  // each part writes only its own list
  const Job job = [&](int64_t part, int64_t phase) {
    if (part == failing && phase == failing_phase) throw std::bad_alloc();
    ran[part].push_back(phase);
  };
  const Proceed always = [] { return true; };
  {
    pybind11::gil_scoped_release no_gil;
    team().run(threads, phases, job, always);
  }
  std::vector<std::pair<int64_t, int64_t>> pairs;
  for (int64_t phase = 0; phase < phases; ++phase) {
    for (int64_t part = 0; part < PARTS; ++part) {
      if (std::count(ran[part].begin(), ran[part].end(), phase)) pairs.emplace_back(part, phase);
    }
  }
  return pairs;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("bernoulli", &bernoulli_samples, "The step's sampler alone (tests)");
  m.def("team_trial", &team_trial, "The team alone, with a part that throws (tests)");
  m.def("rest", [] { team().rest(); }, "The steps to come run on one thread: the worker threads sleep now");
  m.def("cd_step", &cd_step, "One CD-k / PCD-k step with binary visible states (see cpu_cd.cpp)");
  m.attr("PARTS") = PARTS;
}
