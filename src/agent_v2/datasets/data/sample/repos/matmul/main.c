/* Print a checksum of the product of two fixed n x n matrices. */
#include <stdio.h>
#include <stdlib.h>

#include "kernel.h"

int main(int argc, char **argv)
{
    if (argc != 2) {
        fprintf(stderr, "usage: %s N\n", argv[0]);
        return 2;
    }
    int n = atoi(argv[1]);
    int *a = malloc(sizeof(int) * n * n);
    int *b = malloc(sizeof(int) * n * n);
    long long *c = malloc(sizeof(long long) * n * n);
    for (int i = 0; i < n * n; i++) {
        a[i] = (i * 7 + 3) % 19 - 9;
        b[i] = (i * 5 + 1) % 23 - 11;
    }
    matmul(n, a, b, c);

    unsigned long long checksum = 0;
    for (int i = 0; i < n * n; i++)
        checksum = checksum * 31 + (unsigned long long)c[i];
    printf("%llu\n", checksum);
    free(a);
    free(b);
    free(c);
    return 0;
}
