/* The kernel under optimisation: count the primes below n. */
#ifndef KERNEL_H
#define KERNEL_H

long count_primes(long n);

#endif
