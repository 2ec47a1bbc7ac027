/* Blocks forever on a page fault nobody serves: registers a page of its
 * own with a userfaultfd it never reads, then touches it. Run without the
 * runtime (`env -u LD_PRELOAD`), its only thread then sleeps in the
 * kernel's handle_userfault, as every thread of a program whose pager
 * faulted on its own region does (for the watchdog test).
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <stdio.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#ifndef UFFD_USER_MODE_ONLY
#define UFFD_USER_MODE_ONLY 1
#endif

int main(void) {
    long page = sysconf(_SC_PAGESIZE);
    int uffd = syscall(SYS_userfaultfd, O_CLOEXEC | UFFD_USER_MODE_ONLY);
    if (uffd < 0) uffd = syscall(SYS_userfaultfd, O_CLOEXEC);
    if (uffd < 0) { perror("userfaultfd"); return 2; }
    struct uffdio_api api = { .api = UFFD_API };
    if (ioctl(uffd, UFFDIO_API, &api)) { perror("UFFDIO_API"); return 2; }
    volatile char *p = mmap(NULL, page, PROT_READ | PROT_WRITE,
                            MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) { perror("mmap"); return 2; }
    struct uffdio_register reg = {
        .range = { (unsigned long)p, page },
        .mode = UFFDIO_REGISTER_MODE_MISSING,
    };
    if (ioctl(uffd, UFFDIO_REGISTER, &reg)) { perror("UFFDIO_REGISTER"); return 2; }
    printf("touching\n");
    fflush(stdout);
    return p[0];
}
