/* No lost or stale write: several threads write and re-read checksummed
 * pages over a large working set while the others write concurrently.
 * Each thread owns a slice and also bumps shared counters on pages all
 * threads touch. Prints the number of mismatches and a digest of the final
 * contents; exits 1 on any mismatch.
 *
 * usage: checksum_stress WORKING_SET_MB THREADS ROUNDS
 */
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define PAGE 4096
static uint8_t *buf;
static size_t pages_per_thread;
static int rounds;
static uint64_t *shared_counters; /* one per page of a shared area */
static size_t shared_pages = 256;
static long mismatches;
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;

static uint64_t mix(uint64_t x) {
    x ^= x >> 33; x *= 0xff51afd7ed558ccdULL; x ^= x >> 33;
    x *= 0xc4ceb9fe1a85ec53ULL; x ^= x >> 33; return x;
}

static void fill(uint8_t *p, uint64_t seed) {
    uint64_t *w = (uint64_t *)p;
    uint64_t sum = 0;
    for (int i = 0; i < PAGE / 8 - 1; i++) { w[i] = mix(seed + i); sum += w[i]; }
    w[PAGE / 8 - 1] = sum;
}

static int check(const uint8_t *p, uint64_t seed) {
    const uint64_t *w = (const uint64_t *)p;
    uint64_t sum = 0;
    for (int i = 0; i < PAGE / 8 - 1; i++) {
        if (w[i] != mix(seed + i)) return 0;
        sum += w[i];
    }
    return w[PAGE / 8 - 1] == sum;
}

static void *worker(void *arg) {
    long t = (long)arg;
    uint8_t *mine = buf + t * pages_per_thread * PAGE;
    long bad = 0;
    uint64_t rng = mix(t + 1);
    for (int r = 0; r < rounds; r++) {
        for (size_t i = 0; i < pages_per_thread; i++) {
            fill(mine + i * PAGE, ((uint64_t)t << 48) ^ ((uint64_t)r << 32) ^ i);
            rng = mix(rng);
            __atomic_fetch_add(&shared_counters[(rng % shared_pages) * (PAGE / 8)], 1, __ATOMIC_RELAXED);
        }
        /* Re-read in a different order than written. */
        for (size_t k = 0; k < pages_per_thread; k++) {
            size_t i = (k * 7919) % pages_per_thread;
            if (!check(mine + i * PAGE, ((uint64_t)t << 48) ^ ((uint64_t)r << 32) ^ i)) bad++;
        }
    }
    pthread_mutex_lock(&lock);
    mismatches += bad;
    pthread_mutex_unlock(&lock);
    return NULL;
}

int main(int argc, char **argv) {
    if (argc != 4) { fprintf(stderr, "usage: %s MB THREADS ROUNDS\n", argv[0]); return 2; }
    size_t mb = strtoul(argv[1], 0, 10);
    int threads = atoi(argv[2]);
    rounds = atoi(argv[3]);
    pages_per_thread = mb * 256 / threads;
    buf = malloc(pages_per_thread * threads * PAGE);
    shared_counters = calloc(shared_pages, PAGE);
    if (!buf || !shared_counters) { perror("malloc"); return 2; }
    pthread_t th[64];
    for (long t = 0; t < threads; t++) pthread_create(&th[t], 0, worker, (void *)t);
    for (int t = 0; t < threads; t++) pthread_join(th[t], 0);
    uint64_t total = 0, digest = 0;
    for (size_t i = 0; i < shared_pages; i++) total += shared_counters[i * (PAGE / 8)];
    size_t expect = (size_t)threads * rounds * pages_per_thread;
    if (total != expect) mismatches++;
    for (size_t i = 0; i < pages_per_thread * threads; i++) digest = mix(digest ^ ((uint64_t *)(buf + i * PAGE))[5]);
    printf("mismatches=%ld counters=%lu/%zu digest=%016lx\n", mismatches, (unsigned long)total, expect, (unsigned long)digest);
    return mismatches ? 1 : 0;
}
