/* Multiply square matrices, one dot product of a row and a column at a time. */
#include "kernel.h"

void matmul(int n, const int *a, const int *b, long long *c)
{
    for (int i = 0; i < n; i++) {
        for (int j = 0; j < n; j++) {
            long long sum = 0;
            for (int k = 0; k < n; k++)
                sum += (long long)a[i * n + k] * b[k * n + j];
            c[i * n + j] = sum;
        }
    }
}
