/* Reads random pages of a buffer for a while and reports every stall: a
 * gap of more than 5 ms between two reads (CLOCK_MONOTONIC, seconds, as
 * `start end`). With a small ExCache under lego every read is a miss, so a
 * stall is a miss that waited: scripts/replbench kills a memory daemon
 * while this runs and reads the failover pause off it.
 *
 * usage: stall BUFFER_MB SECONDS
 * prints: one `stall START END` line per stall, then `reads N sum X`.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: stall BUFFER_MB SECONDS\n");
        return 2;
    }
    size_t pages = (size_t)atol(argv[1]) * 256;
    double seconds = atof(argv[2]);
    uint64_t *buf = malloc(pages * 4096);
    if (!buf) return 2;
    /* Random words: pages that do not compress go to the memory daemons,
     * not to lego's compressed tier. */
    uint64_t r = 0x9e3779b97f4a7c15ull;
    for (size_t i = 0; i < pages; i++) {
        for (int k = 1; k < 512; k++) {
            r ^= r << 13; r ^= r >> 7; r ^= r << 17;
            buf[i * 512 + k] = r;
        }
        buf[i * 512] = i * 2654435761u;
    }
    printf("filled %.6f\n", now());
    fflush(stdout);
    uint64_t x = 88172645463325252ull, sum = 0, reads = 0;
    double start = now(), last = start;
    while (last - start < seconds) {
        x ^= x << 13; x ^= x >> 7; x ^= x << 17;
        size_t i = x % pages;
        if (buf[i * 512] != i * 2654435761u) {
            printf("mismatch at page %zu\n", i);
            return 1;
        }
        sum += buf[i * 512];
        reads++;
        double t = now();
        if (t - last > 0.005) printf("stall %.6f %.6f\n", last, t);
        last = t;
    }
    printf("reads %llu sum %llu\n", (unsigned long long)reads, (unsigned long long)sum);
    return 0;
}
