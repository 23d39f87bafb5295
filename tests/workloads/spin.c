/* The smallest busy loop: one instruction spins until killed. Built
 * static and not position-independent, every copy has the same addresses,
 * so every copy's samples share one or two stacks, told apart only by
 * process: N copies make N keys in the kernel's count map.
 *
 * Usage: spin SECONDS
 */
#include <stdlib.h>
#include <unistd.h>

int main(int argc, char **argv) {
  alarm(argc > 1 ? (unsigned)atoi(argv[1]) : 10);
  for (;;)
    __asm__ volatile("");
}
