/* Kernel-side access to non-resident memory: write(2) from and read(2)
 * into buffers whose pages were evicted must transfer exactly what they do
 * on plain Linux.
 *
 * usage: kernel_access MB FILE
 */
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

int main(int argc, char **argv) {
    if (argc != 3) { fprintf(stderr, "usage: %s MB FILE\n", argv[0]); return 2; }
    size_t len = strtoul(argv[1], 0, 10) << 20;
    uint8_t *a = malloc(len), *b = malloc(len);
    if (!a || !b) { perror("malloc"); return 2; }
    for (size_t i = 0; i < len; i++) a[i] = (uint8_t)(i * 131 + (i >> 12));
    memset(b, 0xEE, len); /* b is written after a: a's pages get evicted */
    int fd = open(argv[2], O_RDWR | O_CREAT | O_TRUNC, 0600);
    if (fd < 0) { perror("open"); return 2; }
    size_t done = 0;
    while (done < len) { /* write(2) straight from non-resident pages */
        ssize_t n = write(fd, a + done, len - done);
        if (n <= 0) { perror("write"); return 1; }
        done += n;
    }
    memset(a, 0, len); /* make b's pages old */
    if (lseek(fd, 0, SEEK_SET) != 0) { perror("lseek"); return 1; }
    done = 0;
    while (done < len) { /* read(2) straight into non-resident pages */
        ssize_t n = read(fd, b + done, len - done);
        if (n <= 0) { fprintf(stderr, "short read at %zu\n", done); return 1; }
        done += n;
    }
    size_t bad = 0;
    uint64_t sum = 0;
    for (size_t i = 0; i < len; i++) {
        if (b[i] != (uint8_t)(i * 131 + (i >> 12))) bad++;
        sum = sum * 31 + b[i];
    }
    close(fd);
    printf("bytes=%zu bad=%zu sum=%016lx\n", len, bad, (unsigned long)sum);
    return bad ? 1 : 0;
}
