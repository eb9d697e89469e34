/* The kernel under optimisation: multiply two n x n integer matrices. */
#ifndef KERNEL_H
#define KERNEL_H

/* c = a * b, all row-major n x n. */
void matmul(int n, const int *a, const int *b, long long *c);

#endif
