/*
 * Time count_primes and print the result as Google Benchmark JSON
 * (the format of --benchmark_format=json), with 9 repetitions and
 * mean, median and stddev aggregates.
 */
#define _POSIX_C_SOURCE 199309L
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#include "kernel.h"

#define REPETITIONS 9

static volatile long sink;

static double now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e9 + t.tv_nsec;
}

static int by_value(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static void entry(const char *name, const char *suffix, const char *kind,
                  int index, double ns, int last)
{
    printf("    {\n      \"name\": \"%s%s\",\n      \"run_name\": \"%s\",\n"
           "      \"run_type\": \"%s\",\n      \"repetitions\": %d,\n",
           name, suffix, name, kind, REPETITIONS);
    if (index >= 0)
        printf("      \"repetition_index\": %d,\n", index);
    else
        printf("      \"aggregate_name\": \"%s\",\n", suffix + 1);
    printf("      \"threads\": 1,\n      \"iterations\": 1,\n"
           "      \"real_time\": %.1f,\n      \"cpu_time\": %.1f,\n"
           "      \"time_unit\": \"ns\"\n    }%s\n", ns, ns, last ? "" : ",");
}

static void run(long n, int last)
{
    char name[64];
    double times[REPETITIONS], sorted[REPETITIONS], mean = 0, var = 0;
    snprintf(name, sizeof name, "BM_count_primes/%ld", n);

    sink = count_primes(n); /* warm-up */
    for (int r = 0; r < REPETITIONS; r++) {
        double start = now_ns();
        sink = count_primes(n);
        times[r] = now_ns() - start;
        sorted[r] = times[r];
        mean += times[r] / REPETITIONS;
    }
    qsort(sorted, REPETITIONS, sizeof(double), by_value);
    for (int r = 0; r < REPETITIONS; r++)
        var += (times[r] - mean) * (times[r] - mean) / (REPETITIONS - 1);

    for (int r = 0; r < REPETITIONS; r++)
        entry(name, "", "iteration", r, times[r], 0);
    entry(name, "_mean", "aggregate", -1, mean, 0);
    entry(name, "_median", "aggregate", -1, sorted[REPETITIONS / 2], 0);
    entry(name, "_stddev", "aggregate", -1, sqrt(var), last);
}

int main(void)
{
    printf("{\n  \"context\": {\n    \"executable\": \"./bench\",\n"
           "    \"library_build_type\": \"release\"\n  },\n"
           "  \"benchmarks\": [\n");
    run(8000, 0);
    run(12000, 1);
    printf("  ]\n}\n");
    return 0;
}
