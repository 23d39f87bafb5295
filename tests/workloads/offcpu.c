/* A program whose threads spend known time off the CPU, in known ways,
 * each measured by the program's own clocks around the call that waits:
 *
 *   sleep  the main thread and two helpers sleep in nanosleep;
 *   lock   a thread waits for a mutex another holds 100 ms at a time
 *          (the holder sleeps while holding it: sleep);
 *   pipe   a thread reads a pipe fed one byte every 40 ms (the feeder
 *          sleeps between writes: sleep);
 *   disk   a thread writes 64 KiB to a file and fsyncs it, again and again;
 *   cpu    a child process ("offcpu-hogs") runs two busy threads pinned
 *          to CPU 0, which take turns: the time each is not running waits
 *          for a CPU.
 *
 * Each wait is measured as the wall time of the call less the thread's CPU
 * time in it and less its time on a run queue in it (run_delay in
 * /proc/thread-self/schedstat): the time it was blocked. What it then
 * waited for a CPU, after its wakeup, a profiler puts under `cpu`; on a
 * slow VM a disk wait's was 0.2-0.3 s of 1.9, enough to put the two
 * figures more than 10% apart when the program counted it as the wait's.
 * Every thread but the busy pair is pinned to another CPU (where there
 * is one), so that its wakeups do not queue behind them. The busy pair's
 * figure is wall less CPU time: all of it waiting for a CPU.
 *
 * Usage: offcpu SECONDS FILE_ON_DISK RESULT_JSON
 * Writes {"pid": P, "hogs_pid": C, "sleep": s, "lock": s, "pipe": s,
 * "disk": s, "cpu": s, "tids": [...], "hogs_tids": [...]} to RESULT_JSON:
 * the seconds each way of waiting took, over the threads of process P
 * ("cpu": of process C), and the thread ids of each process.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <pthread.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

enum { SLEEP, LOCK, PIPE, DISK, CPU, CAUSES };
static const char *names[CAUSES] = {"sleep", "lock", "pipe", "disk", "cpu"};
static double spent[CAUSES];
static pthread_mutex_t spent_lock = PTHREAD_MUTEX_INITIALIZER;
static double deadline;
static const char *disk_path;
static pthread_mutex_t held = PTHREAD_MUTEX_INITIALIZER;
static int pipe_fds[2];
/* Thread ids of this process; the child's go to shared memory. */
static int tids[16];
static int ntids;
static int *shared_tids;

static void note_tid(void) {
  int tid = (int)gettid();
  while (pthread_mutex_trylock(&spent_lock) != 0)
    ;
  if (shared_tids) {
    if (shared_tids[0] < 15)
      shared_tids[1 + shared_tids[0]++] = tid;
  } else if (ntids < 16) {
    tids[ntids++] = tid;
  }
  pthread_mutex_unlock(&spent_lock);
}

static double now(clockid_t c) {
  struct timespec t;
  clock_gettime(c, &t);
  return t.tv_sec + t.tv_nsec / 1e9;
}

/* Seconds the calling thread has waited on a run queue (schedstat's
 * second field), from a descriptor kept per thread. */
static __thread int schedstat_fd = -1;
static double run_delay(void) {
  if (schedstat_fd < 0)
    schedstat_fd = open("/proc/thread-self/schedstat", O_RDONLY | O_CLOEXEC);
  char b[128];
  ssize_t n = pread(schedstat_fd, b, sizeof b - 1, 0);
  unsigned long long run, delay;
  if (n <= 0) {
    perror("/proc/thread-self/schedstat");
    exit(1);
  }
  b[n] = 0;
  if (sscanf(b, "%llu %llu", &run, &delay) != 2) {
    fprintf(stderr, "schedstat: %s\n", b);
    exit(1);
  }
  return delay / 1e9;
}

/* The calling thread's wall, CPU and run-queue clocks. */
struct mark {
  double wall, cpu, queued;
};
static struct mark mark(void) {
  return (struct mark){now(CLOCK_MONOTONIC), now(CLOCK_THREAD_CPUTIME_ID), run_delay()};
}
/* Off-CPU seconds since `m`: blocked or waiting for a CPU. */
static double off_since(struct mark m) {
  return (now(CLOCK_MONOTONIC) - m.wall) - (now(CLOCK_THREAD_CPUTIME_ID) - m.cpu);
}
/* Blocked seconds since `m`: off the CPU and not on a run queue. */
static double blocked_since(struct mark m) {
  double off = off_since(m);
  return off - (run_delay() - m.queued);
}

static void add(int cause, double s) {
  /* Spinning, not blocking: taking this lock must not count as a wait. */
  while (pthread_mutex_trylock(&spent_lock) != 0)
    ;
  spent[cause] += s;
  pthread_mutex_unlock(&spent_lock);
}

static void pin(int cpu) {
  cpu_set_t set;
  CPU_ZERO(&set);
  CPU_SET(cpu, &set);
  sched_setaffinity(0, sizeof set, &set);
}

static void pin_light(void) {
  if (sysconf(_SC_NPROCESSORS_ONLN) > 1)
    pin(1);
}

static void nap(double s) {
  struct timespec t = {(time_t)s, (long)((s - (time_t)s) * 1e9)};
  struct mark m = mark();
  nanosleep(&t, NULL);
  add(SLEEP, blocked_since(m));
}

static void *sleeper(void *arg) {
  (void)arg;
  note_tid();
  pin_light();
  while (now(CLOCK_MONOTONIC) < deadline)
    nap(0.05);
  return NULL;
}

static void *holder(void *arg) {
  (void)arg;
  pthread_setname_np(pthread_self(), "t-holder");
  note_tid();
  pin_light();
  while (now(CLOCK_MONOTONIC) < deadline) {
    pthread_mutex_lock(&held);
    nap(0.1);
    pthread_mutex_unlock(&held);
    nap(0.01);
  }
  return NULL;
}

static void *waiter(void *arg) {
  (void)arg;
  pthread_setname_np(pthread_self(), "t-lock");
  note_tid();
  pin_light();
  nap(0.02);
  while (now(CLOCK_MONOTONIC) < deadline) {
    struct mark m = mark();
    pthread_mutex_lock(&held);
    add(LOCK, blocked_since(m));
    pthread_mutex_unlock(&held);
    nap(0.005);
  }
  return NULL;
}

static void *feeder(void *arg) {
  (void)arg;
  pthread_setname_np(pthread_self(), "t-feeder");
  note_tid();
  pin_light();
  while (now(CLOCK_MONOTONIC) < deadline) {
    nap(0.04);
    if (write(pipe_fds[1], "x", 1) != 1)
      break;
  }
  close(pipe_fds[1]);
  return NULL;
}

static void *reader(void *arg) {
  (void)arg;
  pthread_setname_np(pthread_self(), "t-pipe");
  note_tid();
  pin_light();
  char c;
  for (;;) {
    struct mark m = mark();
    ssize_t n = read(pipe_fds[0], &c, 1);
    add(PIPE, blocked_since(m));
    if (n != 1)
      break;
  }
  return NULL;
}

static void *disk(void *arg) {
  (void)arg;
  pthread_setname_np(pthread_self(), "t-disk");
  note_tid();
  pin_light();
  static char block[65536];
  memset(block, 'd', sizeof block);
  int fd = open(disk_path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
  if (fd < 0) {
    perror(disk_path);
    exit(1);
  }
  while (now(CLOCK_MONOTONIC) < deadline) {
    struct mark m = mark();
    if (pwrite(fd, block, sizeof block, 0) != (ssize_t)sizeof block || fdatasync(fd) != 0) {
      perror("write");
      exit(1);
    }
    add(DISK, blocked_since(m));
  }
  close(fd);
  unlink(disk_path);
  return NULL;
}

static void *hog(void *arg) {
  pthread_setname_np(pthread_self(), arg);
  note_tid();
  pin(0);
  struct mark m = mark();
  volatile unsigned long n = 0;
  while (now(CLOCK_MONOTONIC) < deadline)
    n++;
  add(CPU, off_since(m));
  return NULL;
}

int main(int argc, char **argv) {
  if (argc != 4) {
    fprintf(stderr, "usage: offcpu SECONDS FILE_ON_DISK RESULT_JSON\n");
    return 2;
  }
  disk_path = argv[2];
  deadline = now(CLOCK_MONOTONIC) + atof(argv[1]);
  if (pipe(pipe_fds) != 0)
    return 1;
  /* The busy pair, in a process of its own; its figure comes back in
   * shared memory. */
  double *hogs_cpu = mmap(NULL, sizeof(double) + 16 * sizeof(int), PROT_READ | PROT_WRITE,
                          MAP_SHARED | MAP_ANONYMOUS, -1, 0);
  int *child_tids = (int *)(hogs_cpu + 1);
  pid_t child = fork();
  if (child == 0) {
    prctl(PR_SET_NAME, "offcpu-hogs");
    shared_tids = child_tids;
    note_tid();
    pthread_t h[2];
    pthread_create(&h[0], NULL, hog, "t-hog1");
    pthread_create(&h[1], NULL, hog, "t-hog2");
    pthread_join(h[0], NULL);
    pthread_join(h[1], NULL);
    *hogs_cpu = spent[CPU];
    _exit(0);
  }
  pin_light();
  void *(*fns[])(void *) = {holder, waiter, feeder, reader, disk};
  enum { N = sizeof fns / sizeof fns[0] };
  pthread_t t[N];
  for (int i = 0; i < N; i++)
    pthread_create(&t[i], NULL, fns[i], NULL);
  sleeper(NULL);
  /* Joins wait on a condition (condvar), not measured here. */
  for (int i = 0; i < N; i++)
    pthread_join(t[i], NULL);
  waitpid(child, NULL, 0);
  spent[CPU] = *hogs_cpu;
  FILE *f = fopen(argv[3], "w");
  if (!f)
    return 1;
  fprintf(f, "{\"pid\": %d, \"hogs_pid\": %d", (int)getpid(), (int)child);
  for (int i = 0; i < CAUSES; i++)
    fprintf(f, ", \"%s\": %.6f", names[i], spent[i]);
  fprintf(f, ", \"tids\": [");
  for (int i = 0; i < ntids; i++)
    fprintf(f, "%s%d", i ? ", " : "", tids[i]);
  fprintf(f, "], \"hogs_tids\": [");
  for (int i = 0; i < child_tids[0]; i++)
    fprintf(f, "%s%d", i ? ", " : "", child_tids[1 + i]);
  fprintf(f, "]}\n");
  fclose(f);
  return 0;
}
