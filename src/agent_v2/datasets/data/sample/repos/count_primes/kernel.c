/* Count the primes below n, by trial division with every smaller number. */
#include "kernel.h"

long count_primes(long n)
{
    long count = 0;
    for (long k = 2; k < n; k++) {
        int prime = 1;
        for (long d = 2; d < k; d++) {
            if (k % d == 0) {
                prime = 0;
                break;
            }
        }
        count += prime;
    }
    return count;
}
