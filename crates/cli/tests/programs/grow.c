/* Grows its memory slowly, then keeps using it: fills MB megabytes of
 * checksummed pages 16 MiB (one placement unit) at a time, pausing STEP_MS
 * after each, then ROUNDS times pauses STEP_MS and checks every page.
 * Prints what it found; exits 1 on any bad page.
 *
 * usage: grow MB STEP_MS ROUNDS
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

#define PAGE 4096
#define UNIT (16UL << 20)

static uint64_t mix(uint64_t x) {
    x ^= x >> 33; x *= 0xff51afd7ed558ccdULL; x ^= x >> 33;
    x *= 0xc4ceb9fe1a85ec53ULL; x ^= x >> 33; return x;
}

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: grow MB STEP_MS ROUNDS\n");
        return 2;
    }
    size_t len = strtoul(argv[1], 0, 10) << 20;
    useconds_t step = (useconds_t)strtoul(argv[2], 0, 10) * 1000;
    int rounds = atoi(argv[3]);
    uint8_t *buf = malloc(len);
    if (!buf) { perror("malloc"); return 2; }
    for (size_t u = 0; u < len; u += UNIT) {
        for (size_t p = u; p < u + UNIT && p < len; p += PAGE) {
            uint64_t *w = (uint64_t *)(buf + p);
            for (int i = 0; i < PAGE / 8; i += 64) w[i] = mix(p + i);
        }
        printf("unit %zu filled\n", u / UNIT);
        fflush(stdout);
        usleep(step);
    }
    long bad = 0;
    uint64_t digest = 0;
    for (int r = 0; r < rounds; r++) {
        usleep(step);
        for (size_t p = 0; p < len; p += PAGE) {
            const uint64_t *w = (const uint64_t *)(buf + p);
            for (int i = 0; i < PAGE / 8; i += 64) {
                if (w[i] != mix(p + i)) bad++;
                digest += w[i];
            }
        }
    }
    printf("rounds=%d bad=%ld digest=%016llx\n", rounds, bad, (unsigned long long)digest);
    return bad != 0;
}
