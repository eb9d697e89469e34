/* Print count_primes(n) for the n given on the command line. */
#include <stdio.h>
#include <stdlib.h>

#include "kernel.h"

int main(int argc, char **argv)
{
    if (argc != 2) {
        fprintf(stderr, "usage: %s N\n", argv[0]);
        return 2;
    }
    printf("%ld\n", count_primes(atol(argv[1])));
    return 0;
}
