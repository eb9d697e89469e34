/*
 * Time matmul and print the result as Google Benchmark JSON
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

static volatile long long sink;

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
                  int index, int iterations, double ns, int last)
{
    printf("    {\n      \"name\": \"%s%s\",\n      \"run_name\": \"%s\",\n"
           "      \"run_type\": \"%s\",\n      \"repetitions\": %d,\n",
           name, suffix, name, kind, REPETITIONS);
    if (index >= 0)
        printf("      \"repetition_index\": %d,\n", index);
    else
        printf("      \"aggregate_name\": \"%s\",\n", suffix + 1);
    printf("      \"threads\": 1,\n      \"iterations\": %d,\n"
           "      \"real_time\": %.1f,\n      \"cpu_time\": %.1f,\n"
           "      \"time_unit\": \"ns\"\n    }%s\n",
           iterations, ns, ns, last ? "" : ",");
}

/* Time `iterations` products per repetition; report the time of one. */
static void run(int n, int iterations, int last)
{
    char name[64];
    int *a = malloc(sizeof(int) * n * n);
    int *b = malloc(sizeof(int) * n * n);
    long long *c = malloc(sizeof(long long) * n * n);
    for (int i = 0; i < n * n; i++) {
        a[i] = (i * 7 + 3) % 19 - 9;
        b[i] = (i * 5 + 1) % 23 - 11;
    }
    double times[REPETITIONS], sorted[REPETITIONS], mean = 0, var = 0;
    snprintf(name, sizeof name, "BM_matmul/%d", n);

    matmul(n, a, b, c); /* warm-up */
    for (int r = 0; r < REPETITIONS; r++) {
        double start = now_ns();
        for (int i = 0; i < iterations; i++) {
            matmul(n, a, b, c);
            sink = c[n * n - 1];
        }
        times[r] = (now_ns() - start) / iterations;
        sorted[r] = times[r];
        mean += times[r] / REPETITIONS;
    }
    qsort(sorted, REPETITIONS, sizeof(double), by_value);
    for (int r = 0; r < REPETITIONS; r++)
        var += (times[r] - mean) * (times[r] - mean) / (REPETITIONS - 1);

    for (int r = 0; r < REPETITIONS; r++)
        entry(name, "", "iteration", r, iterations, times[r], 0);
    entry(name, "_mean", "aggregate", -1, iterations, mean, 0);
    entry(name, "_median", "aggregate", -1, iterations, sorted[REPETITIONS / 2], 0);
    entry(name, "_stddev", "aggregate", -1, iterations, sqrt(var), last);
    free(a);
    free(b);
    free(c);
}

int main(void)
{
    printf("{\n  \"context\": {\n    \"executable\": \"./bench\",\n"
           "    \"library_build_type\": \"release\"\n  },\n"
           "  \"benchmarks\": [\n");
    run(96, 24, 0);
    run(160, 6, 1);
    printf("  ]\n}\n");
    return 0;
}
