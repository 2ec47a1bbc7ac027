/* fork gives copy-on-write semantics: the child sees the parent's memory as
 * it was at fork (including pages evicted at that moment), and neither sees
 * the other's later writes. Several children in turn, the parent writing
 * concurrently. The parent also has idle threads whose memory (glibc's
 * per-thread data included) is evicted by the time it forks: glibc hands
 * their cached stacks to threads created in the child. Exits 0 only if
 * every check passed.
 *
 * usage: fork_isolation MB CHILDREN
 */
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

#define PAGE 4096
static uint64_t val(size_t page, uint64_t gen) { return (page * 0x9e3779b97f4a7c15ULL) ^ (gen << 56) ^ gen; }

static size_t fill(uint64_t *p, size_t pages, uint64_t gen) {
    for (size_t i = 0; i < pages; i++) p[i * (PAGE / 8)] = val(i, gen), p[i * (PAGE / 8) + 1] = gen;
    return pages;
}

static size_t check(const uint64_t *p, size_t pages, uint64_t gen) {
    size_t bad = 0;
    for (size_t i = 0; i < pages; i++)
        if (p[i * (PAGE / 8)] != val(i, gen) || p[i * (PAGE / 8) + 1] != gen) bad++;
    return bad;
}

static pthread_mutex_t m = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cv = PTHREAD_COND_INITIALIZER;
static void *idle(void *arg) {
    (void)arg;
    pthread_mutex_lock(&m);
    pthread_cond_wait(&cv, &m); /* never signalled */
    pthread_mutex_unlock(&m);
    return NULL;
}

int main(int argc, char **argv) {
    if (argc != 3) return 2;
    pthread_t th[2];
    for (int i = 0; i < 2; i++) pthread_create(&th[i], 0, idle, 0);
    size_t pages = strtoul(argv[1], 0, 10) * 256;
    int children = atoi(argv[2]);
    uint64_t *p = malloc(pages * PAGE);
    if (!p) return 2;
    size_t bad = 0;
    uint64_t gen = 1;
    fill(p, pages, gen);
    for (int c = 0; c < children; c++) {
        pid_t pid = fork();
        if (pid < 0) { perror("fork"); return 2; }
        if (pid == 0) {
            size_t b = check(p, pages, gen);      /* the parent's memory at fork */
            fill(p, pages, 1000 + c);              /* private writes */
            b += check(p, pages, 1000 + c);
            _exit(b ? 1 : 0);
        }
        fill(p, pages, gen + 1);                   /* the parent writes meanwhile */
        bad += check(p, pages, gen + 1);
        gen++;
        int st;
        waitpid(pid, &st, 0);
        if (!WIFEXITED(st) || WEXITSTATUS(st) != 0) {
            fprintf(stderr, "child %d failed: status %d\n", c, st);
            bad++;
        }
        bad += check(p, pages, gen);               /* the child's writes stayed in the child */
    }
    printf("children=%d bad=%zu\n", children, bad);
    return bad ? 1 : 0;
}
