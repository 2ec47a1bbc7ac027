/* Signal handlers that run while page faults are being served, and that
 * touch disaggregated memory themselves: a 200 µs interval timer fires
 * while the main loop sweeps a working set larger than the ExCache.
 *
 * usage: signals_during_faults MB ROUNDS
 */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>

static volatile unsigned long *ticks; /* lives in the heap, i.e. disaggregated */
static unsigned char *buf;
static size_t len;

static void on_alarm(int sig) {
    (void)sig;
    ticks[0]++;
    /* Touch some page of the big buffer from the handler too. */
    size_t i = (ticks[0] * 7919 * 4096) % len;
    ticks[1] += buf[i];
}

int main(int argc, char **argv) {
    len = strtoul(argv[1], 0, 10) << 20;
    int rounds = atoi(argv[2]);
    ticks = calloc(2, sizeof *ticks);
    buf = malloc(len);
    memset(buf, 1, len);
    struct sigaction sa = {0};
    sa.sa_handler = on_alarm;
    sa.sa_flags = SA_RESTART;
    sigaction(SIGALRM, &sa, 0);
    struct itimerval it = {{0, 200}, {0, 200}};
    setitimer(ITIMER_REAL, &it, 0);
    unsigned long sum = 0;
    for (int r = 0; r < rounds; r++)
        for (size_t i = 0; i < len; i += 4096) sum += buf[i]++;
    struct itimerval off = {{0, 0}, {0, 0}};
    setitimer(ITIMER_REAL, &off, 0);
    /* Every byte read was 1 + round; handler reads are counted separately. */
    unsigned long expect = 0;
    for (int r = 0; r < rounds; r++) expect += (unsigned long)(len / 4096) * (1 + r);
    printf("sum_ok=%d handler_ran=%d\n", sum == expect, ticks[0] > 0);
    return sum == expect && ticks[0] > 0 ? 0 : 1;
}
