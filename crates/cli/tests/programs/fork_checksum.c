/* Checksummed pages across forks: the parent fills a working set of pages,
 * then, FORKS times, forks a child that checks every page it inherited and
 * rewrites them all (checking them again), while the parent rewrites a
 * part of its own; after each child the parent checks all of its pages.
 * Deterministic: prints the same under lego as without it.
 *
 * usage: fork_checksum WORKING_SET_MB FORKS
 * prints: mismatches=N digest=X; exits 1 on any mismatch.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

#define PAGE 4096
#define WORDS (PAGE / 8)

static uint64_t mix(uint64_t x) {
    x ^= x >> 33; x *= 0xff51afd7ed558ccdULL; x ^= x >> 33;
    x *= 0xc4ceb9fe1a85ec53ULL; x ^= x >> 33; return x;
}

static void fill(uint64_t *p, uint64_t seed) {
    for (int k = 0; k < WORDS; k++) p[k] = mix(seed * WORDS + k);
}

static long check(uint64_t *p, uint64_t seed) {
    for (int k = 0; k < WORDS; k++)
        if (p[k] != mix(seed * WORDS + k)) return 1;
    return 0;
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: fork_checksum WORKING_SET_MB FORKS\n");
        return 2;
    }
    size_t pages = (size_t)atol(argv[1]) * 256;
    int forks = atoi(argv[2]);
    uint64_t *buf = malloc(pages * PAGE);
    uint64_t *gen = calloc(pages, sizeof *gen); /* the seed each page holds */
    if (!buf || !gen) return 2;
    for (size_t i = 0; i < pages; i++) {
        gen[i] = i + 1;
        fill(buf + i * WORDS, gen[i]);
    }
    long bad = 0;
    uint64_t digest = 0;
    for (int f = 0; f < forks; f++) {
        pid_t child = fork();
        if (child < 0) return 2;
        if (child == 0) {
            long cbad = 0;
            for (size_t i = 0; i < pages; i++) {
                cbad += check(buf + i * WORDS, gen[i]);
                fill(buf + i * WORDS, gen[i] * 7919 + f);
            }
            for (size_t i = 0; i < pages; i++)
                cbad += check(buf + i * WORDS, gen[i] * 7919 + f);
            _exit(cbad > 250 ? 250 : (int)cbad);
        }
        /* The parent changes every third page while the child runs. */
        for (size_t i = f % 3; i < pages; i += 3) {
            gen[i] = gen[i] * 31 + f + 1;
            fill(buf + i * WORDS, gen[i]);
        }
        int st;
        if (waitpid(child, &st, 0) != child) return 2;
        if (!WIFEXITED(st)) {
            fprintf(stderr, "child %d ended by signal %d\n", f, WTERMSIG(st));
            return 2;
        }
        bad += WEXITSTATUS(st);
        for (size_t i = 0; i < pages; i++) bad += check(buf + i * WORDS, gen[i]);
    }
    for (size_t i = 0; i < pages; i++) digest = mix(digest ^ buf[i * WORDS + 5]);
    printf("mismatches=%ld digest=%016llx\n", bad, (unsigned long long)digest);
    return bad != 0;
}
