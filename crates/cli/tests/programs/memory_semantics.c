/* The memory interface under lego behaves as on Linux. Each check prints
 * "ok NAME" or "FAIL NAME"; a final SIGSEGV check (argument "segv") touches
 * a PROT_NONE guard page and must die of SIGSEGV.
 *
 * usage: memory_semantics MB [segv]
 */
#define _GNU_SOURCE
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#define PAGE 4096
static int failures;
static void report(const char *name, int ok) {
    printf("%s %s\n", ok ? "ok" : "FAIL", name);
    if (!ok) failures++;
}

static void fill(unsigned char *p, size_t len, unsigned seed) {
    for (size_t i = 0; i < len; i += 64) p[i] = (unsigned char)(i / 64 * 7 + seed);
}
static int same(const unsigned char *p, size_t len, unsigned seed) {
    for (size_t i = 0; i < len; i += 64) if (p[i] != (unsigned char)(i / 64 * 7 + seed)) return 0;
    return 1;
}
static int zero(const unsigned char *p, size_t len) {
    for (size_t i = 0; i < len; i++) if (p[i]) return 0;
    return 1;
}

/* Something big enough to push other pages out of a small ExCache. */
static void churn(size_t len) {
    unsigned char *c = malloc(len);
    fill(c, len, 3);
    free(c);
}

int main(int argc, char **argv) {
    size_t len = strtoul(argv[1], 0, 10) << 20;
    int segv = argc > 2;

    unsigned char *a = mmap(0, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    fill(a, len, 1);
    churn(len);
    report("mmap contents survive eviction", same(a, len, 1));

    madvise(a, len / 2, MADV_DONTNEED);
    report("MADV_DONTNEED reads zeros", zero(a, len / 2) && same(a + len / 2, len / 2, 1));

    fill(a, len, 5);
    unsigned char *b = mremap(a, len, 2 * len, MREMAP_MAYMOVE);
    report("mremap grow keeps contents", b != MAP_FAILED && same(b, len, 5) && zero(b + len, len));
    churn(len);
    report("mremap grown region survives eviction", same(b, len, 5));
    unsigned char *c = mremap(b, 2 * len, len / 2, 0);
    report("mremap shrink keeps head", c == b && same(c, len / 2, 5));

    unsigned char *f = mmap(c + PAGE, PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0);
    report("MAP_FIXED over own mapping gives zeros", f == c + PAGE && zero(f, PAGE) && same(c, PAGE, 5));
    munmap(c, len / 2);

    unsigned char *g = mmap(0, 4 * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    for (int k = 0; k < 4; k++) fill(g + k * PAGE, PAGE, 9 + k);
    report("mprotect PROT_NONE", mprotect(g + PAGE, PAGE, PROT_NONE) == 0);
    churn(len);
    report("pages around a guard page survive",
           same(g, PAGE, 9) && same(g + 2 * PAGE, PAGE, 11) && same(g + 3 * PAGE, PAGE, 12));
    mprotect(g + PAGE, PAGE, PROT_READ | PROT_WRITE);
    report("guard page readable again", same(g + PAGE, PAGE, 10));

    size_t huge = (size_t)8 << 30; /* 8 GiB virtual, sparsely touched */
    unsigned char *h = mmap(0, huge, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    int ok = h != MAP_FAILED;
    for (size_t off = 0; ok && off < huge; off += (size_t)256 << 20) h[off] = (unsigned char)(off >> 20);
    churn(len);
    for (size_t off = 0; ok && off < huge; off += (size_t)256 << 20) ok = h[off] == (unsigned char)(off >> 20);
    report("8 GiB sparse mapping", ok);
    munmap(h, huge);

    void *s = sbrk(0);
    report("sbrk grows", sbrk(len) == s && sbrk(0) == (char *)s + len);
    fill(s, len, 11);
    churn(len);
    report("sbrk memory survives eviction", same(s, len, 11));
    sbrk(-(intptr_t)len);

    if (segv) {
        fflush(stdout);
        g[PAGE] = 0;
        mprotect(g + PAGE, PAGE, PROT_NONE);
        volatile unsigned char *bad = g + PAGE;
        *bad = 1; /* must kill us */
        printf("FAIL survived a write to a PROT_NONE page\n");
        return 1;
    }
    printf("failures=%d\n", failures);
    return failures != 0;
}
