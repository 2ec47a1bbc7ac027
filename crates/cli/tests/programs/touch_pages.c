/* Touches a large buffer over and over (for the budget and daemon-failure
 * tests): writes every page, then keeps re-reading and re-writing them for
 * ROUNDS rounds, printing progress.
 *
 * usage: touch_pages MB ROUNDS
 */
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

int main(int argc, char **argv) {
    if (argc != 3) return 2;
    size_t len = strtoul(argv[1], 0, 10) << 20;
    int rounds = atoi(argv[2]);
    volatile unsigned char *p = malloc(len);
    if (!p) { perror("malloc"); return 2; }
    unsigned long sum = 0;
    for (int r = 0; r < rounds; r++) {
        for (size_t i = 0; i < len; i += 4096) { p[i] = (unsigned char)(i / 4096 + r); }
        for (size_t i = 0; i < len; i += 4096) sum += p[i];
        printf("round %d\n", r);
        fflush(stdout);
    }
    printf("sum=%lu\n", sum);
    return 0;
}
