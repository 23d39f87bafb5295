/* Phases in time, for the report's heat map: phase_alpha burns one CPU
 * for ALPHA_MS, then the process sleeps for SLEEP_MS, then phase_beta
 * burns for BETA_MS. Each phase has its own function, so a range of the
 * capture folds to one or the other. */
#include <stdint.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

static volatile uint64_t sink;

static uint64_t now_ms(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000 + (uint64_t)t.tv_nsec / 1000000;
}

__attribute__((noinline)) void phase_alpha(uint64_t ms) {
    uint64_t end = now_ms() + ms;
    while (now_ms() < end)
        for (int i = 0; i < 100000; i++) sink += i;
}

__attribute__((noinline)) void phase_beta(uint64_t ms) {
    uint64_t end = now_ms() + ms;
    while (now_ms() < end)
        for (int i = 0; i < 100000; i++) sink ^= i;
}

int main(int argc, char **argv) {
    uint64_t alpha = argc > 1 ? strtoull(argv[1], 0, 10) : 2000;
    uint64_t pause = argc > 2 ? strtoull(argv[2], 0, 10) : 1000;
    uint64_t beta = argc > 3 ? strtoull(argv[3], 0, 10) : 2000;
    phase_alpha(alpha);
    usleep(pause * 1000);
    phase_beta(beta);
    return 0;
}
