/* fork in the situations that can leave a child (or its parent) waiting on
 * a page nobody serves. Each mode checks copy-on-write contents page by
 * page and prints one deterministic line; exits 0 only if every check
 * passed.
 *
 * usage: fork_hazards MODE MB
 *   busy    two threads keep writing (and paging) while the main thread
 *           forks; each child checks that every page is whole, writes its
 *           own pattern and creates a thread of its own
 *   signal  a timer's signal handler forks while the main thread allocates,
 *           frees and touches memory; the child checks a snapshot and exits
 *   nested  a child forks a grandchild, which forks again, each level
 *           checking what it inherited and writing its own generation
 *   spawn   posix_spawn and vfork+exec of /bin/true from a paging program
 */
#include <pthread.h>
#include <signal.h>
#include <spawn.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <unistd.h>

#define PAGE 4096
#define WORDS (PAGE / 8)
extern char **environ;

static uint64_t *mem;
static size_t pages;

/* Every word of page i holds tag(i, gen): a torn or stale page shows. */
static uint64_t tag(size_t i, uint64_t gen) { return (i * 0x9e3779b97f4a7c15ULL) ^ (gen << 40) ^ gen; }

static void fill(size_t from, size_t to, uint64_t gen) {
    for (size_t i = from; i < to; i++)
        for (size_t w = 0; w < WORDS; w += 64) mem[i * WORDS + w] = tag(i, gen);
}

/* Pages of [from, to) that are not whole (all sampled words one tag of a
 * generation in [lo, hi]). */
static size_t torn(size_t from, size_t to, uint64_t lo, uint64_t hi) {
    size_t bad = 0;
    for (size_t i = from; i < to; i++) {
        uint64_t first = mem[i * WORDS];
        int ok = 0;
        for (uint64_t g = lo; g <= hi && !ok; g++) ok = first == tag(i, g);
        for (size_t w = 64; w < WORDS && ok; w += 64) ok = mem[i * WORDS + w] == first;
        bad += !ok;
    }
    return bad;
}

static int wait_ok(pid_t pid) {
    int st;
    if (waitpid(pid, &st, 0) != pid) return 0;
    return WIFEXITED(st) && WEXITSTATUS(st) == 0;
}

/* ---- busy: forks while two threads write ---- */
static volatile int stop;
static uint64_t gens[2];
static void *writer(void *arg) {
    size_t half = (size_t)arg, from = half * pages / 2, to = (half + 1) * pages / 2;
    while (!stop) fill(from, to, ++gens[half]);
    return NULL;
}
static void *child_thread(void *arg) {
    fill(0, pages / 4, 7777);
    return arg;
}
static int busy(void) {
    fill(0, pages, 1);
    gens[0] = gens[1] = 1;
    pthread_t th[2];
    for (size_t k = 0; k < 2; k++) pthread_create(&th[k], 0, writer, (void *)k);
    int good = 0, forks = 6;
    for (int c = 0; c < forks; c++) {
        usleep(50000);
        pid_t pid = fork();
        if (pid == 0) {
            /* Each half was being written with some generation; every page
             * must be whole, of a generation written so far. */
            /* The page each writer was in the middle of may be torn (as on
             * Linux: fork copies pages one by one while the writers run). */
            size_t b0 = torn(0, pages, 1, 1000000), bad = b0 > 2 ? b0 : 0;
            pthread_t t;
            if (pthread_create(&t, 0, child_thread, 0) != 0) _exit(3);
            pthread_join(t, 0);
            bad += torn(0, pages / 4, 7777, 7777);
            _exit(bad == 0 ? 0 : 1);
        }
        good += pid > 0 && wait_ok(pid);
    }
    stop = 1;
    for (int k = 0; k < 2; k++) pthread_join(th[k], 0);
    size_t bad = torn(0, pages / 2, gens[0], gens[0]) + torn(pages / 2, pages, gens[1], gens[1]);
    printf("busy: %d of %d children ok, parent %s\n", good, forks, bad ? "torn" : "ok");
    return good == forks && !bad ? 0 : 1;
}

/* ---- signal: fork from a signal handler ---- */
static volatile sig_atomic_t forked, children_ok;
static volatile pid_t kids[64];
static void on_alarm(int sig) {
    (void)sig;
    if (forked >= 8) return;
    pid_t pid = fork();
    if (pid == 0) _exit(torn(0, pages, 1, 1) == 0 ? 0 : 1);
    if (pid > 0) kids[forked++] = pid;
}
static int in_signal(void) {
    fill(0, pages, 1);
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_alarm;
    sa.sa_flags = SA_RESTART;
    sigaction(SIGALRM, &sa, 0);
    struct itimerval it = {{0, 20000}, {0, 20000}};
    setitimer(ITIMER_REAL, &it, 0);
    /* Allocation churn (the handler may interrupt malloc or free) and
     * reads of the whole range (misses and evictions). */
    size_t sum = 0;
    while (forked < 8) {
        for (int k = 0; k < 64; k++) {
            char *b = malloc(4096 + k * 8192);
            if (b) b[0] = (char)k, sum += (unsigned char)b[0], free(b);
        }
        sum += torn(0, pages, 1, 1);
    }
    struct itimerval off = {{0, 0}, {0, 0}};
    setitimer(ITIMER_REAL, &off, 0);
    int good = 0;
    for (int k = 0; k < forked; k++) good += wait_ok(kids[k]);
    size_t bad = torn(0, pages, 1, 1);
    printf("signal: %d of %d children ok, parent %s\n", good, (int)forked, bad ? "torn" : "ok");
    return good == forked && !bad && sum > 0 ? 0 : 1;
}

/* ---- nested forks ---- */
static int level(int depth, uint64_t gen) {
    size_t bad = torn(0, pages, gen, gen);
    fill(0, pages, gen + 1);
    if (depth > 0) {
        pid_t pid = fork();
        if (pid == 0) _exit(level(depth - 1, gen + 1));
        if (pid < 0 || !wait_ok(pid)) bad++;
        /* The child's writes are its own. */
        bad += torn(0, pages, gen + 1, gen + 1);
    }
    return bad ? 1 : 0;
}
static int nested(void) {
    fill(0, pages, 1);
    int r = level(3, 1);
    printf("nested: %s\n", r ? "failed" : "ok");
    return r;
}

/* ---- posix_spawn and vfork ---- */
static int spawn(void) {
    fill(0, pages, 1);
    char *argv[] = {"true", NULL};
    int good = 0;
    for (int k = 0; k < 4; k++) {
        pid_t pid;
        if (posix_spawn(&pid, "/bin/true", 0, 0, argv, environ) == 0) good += wait_ok(pid);
        pid = vfork();
        if (pid == 0) {
            execve("/bin/true", argv, environ);
            _exit(127);
        }
        good += pid > 0 && wait_ok(pid);
        fill(0, pages, 1);
    }
    size_t bad = torn(0, pages, 1, 1);
    printf("spawn: %d of 8 children ok, parent %s\n", good, bad ? "torn" : "ok");
    return good == 8 && !bad ? 0 : 1;
}

int main(int argc, char **argv) {
    if (argc != 3) return 2;
    pages = strtoul(argv[2], 0, 10) * 256;
    mem = malloc(pages * PAGE);
    if (!mem) return 2;
    setvbuf(stdout, 0, _IONBF, 0);
    if (!strcmp(argv[1], "busy")) return busy();
    if (!strcmp(argv[1], "signal")) return in_signal();
    if (!strcmp(argv[1], "nested")) return nested();
    if (!strcmp(argv[1], "spawn")) return spawn();
    return 2;
}
