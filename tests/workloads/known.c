/* A workload whose CPU profile is known in advance.
 *
 * Each round calls work_alpha, work_beta and work_gamma -> work_delta,
 * which spin on the time-stamp counter for 5, 3 and 2 units of time: the
 * profile must give them 50%, 30% and 20% of the process's samples.
 * (Spinning by time, not by iteration count: the same loop runs at
 * different speeds in different functions, by stack alignment and the
 * like, so counts would not give known shares.)
 *
 * By default every leaf keeps its deadline on its stack, so with
 * -fno-omit-frame-pointer -mno-omit-leaf-frame-pointer each leaf sets up
 * its own frame and frame-pointer unwinding sees its caller ("framed
 * leaves"); -DUNFRAMED_LEAVES builds leaves without a frame.
 *
 * Usage: known SECONDS
 */
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static unsigned long long ticks_per_unit;
/* Loop iterations done while spinning: the work the process got done,
 * which a profiler's overhead lowers (the time-based rounds do not show
 * it). */
static unsigned long long spins;

static inline unsigned long long tsc(void) {
  unsigned int lo, hi;
  __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
  return ((unsigned long long)hi << 32) | lo;
}

#ifdef UNFRAMED_LEAVES
/* The deadline stays in a register: the leaves need no stack, and gcc
 * shrink-wraps them without a frame even with -fno-omit-frame-pointer, as
 * Debian builds do: frame-pointer unwinding then loses each leaf's caller. */
#define SPIN(units)                                                            \
  do {                                                                         \
    unsigned long long end = tsc() + (units) * ticks_per_unit / 16, n = 0;     \
    while (tsc() < end)                                                        \
      n++;                                                                     \
    spins += n;                                                                \
  } while (0)
#else
/* The deadline lives on the stack: each leaf sets up a frame. */
#define SPIN(units)                                                            \
  do {                                                                         \
    volatile unsigned long long end = tsc() + (units) * ticks_per_unit / 16;   \
    unsigned long long n = 0;                                                  \
    while (tsc() < end)                                                        \
      n++;                                                                     \
    spins += n;                                                                \
  } while (0)
#endif

__attribute__((noinline)) void work_alpha(unsigned long long u) { SPIN(5 * u); }
/* -DBETA_TENTHS=36 gives work_beta 20% more work (3.6 units instead of
 * 3: its share goes from 30% to 34%), for the diff tests. */
#ifndef BETA_TENTHS
#define BETA_TENTHS 30
#endif
__attribute__((noinline)) void work_beta(unsigned long long u) { SPIN(BETA_TENTHS * u / 10); }
__attribute__((noinline)) void work_delta(unsigned long long u) { SPIN(2 * u); }
__attribute__((noinline)) void work_gamma(unsigned long long u) {
  work_delta(u);
  __asm__ volatile("" ::: "memory"); /* no tail call: keep gamma's frame */
}

static double now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec + ts.tv_nsec / 1e9;
}

int main(int argc, char **argv) {
  double seconds = argc > 1 ? atof(argv[1]) : 3.0;
  /* One unit is 0.37 ms of time-stamp counter, calibrated over 50 ms; each
   * round scales it by a random factor in [0.5, 1.5) (the SPIN macro divides
   * by 16), so the round length never locks in step with a sampling period:
   * a periodic sampler would otherwise alias with a periodic workload. */
  double t0 = now();
  unsigned long long c0 = tsc();
  while (now() < t0 + 0.05)
    ;
  ticks_per_unit = (unsigned long long)((tsc() - c0) / (now() - t0) * 0.00037);
  srand(42);
  double end = now() + seconds;
  unsigned long rounds = 0;
  while (now() < end) {
    unsigned long long u = 8 + rand() % 16;
    work_alpha(u);
    work_beta(u);
    work_gamma(u);
    rounds++;
  }
  printf("%lu rounds %llu spins\n", rounds, spins);
  return 0;
}
