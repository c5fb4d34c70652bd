/* A minimal test harness for the hubmsg C tests: each test is a function run by RUN(); a failed
 * check prints the test, the expression, the result name and hubmsg's last error, then exits 1.
 * Every passing test prints "c-test ok <name>", which the Rust runner counts. */
#ifndef HUBMSG_TEST_CHECK_H
#define HUBMSG_TEST_CHECK_H

#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "hubmsg.h"

static const char *current_test = "setup";

#define FAIL_NOW(...)                                                                      \
    do {                                                                                   \
        fprintf(stderr, "%s:%d: ", __FILE__, __LINE__);                                    \
        fprintf(stderr, __VA_ARGS__);                                                      \
        fprintf(stderr, "\n  last error: %s\n", hubmsg_last_error_message());              \
        printf("c-test FAIL %s\n", current_test);                                          \
        fflush(stdout);                                                                    \
        exit(1);                                                                           \
    } while (0)

#define CHECK(cond)                                                                        \
    do {                                                                                   \
        if (!(cond)) FAIL_NOW("check failed: %s", #cond);                                  \
    } while (0)

#define CHECK_RC(expr, want)                                                               \
    do {                                                                                   \
        hubmsg_result rc_ = (expr);                                                        \
        if (rc_ != (want))                                                                 \
            FAIL_NOW("%s returned %s (%d), expected %s", #expr, hubmsg_result_str(rc_),    \
                     (int)rc_, #want);                                                     \
    } while (0)

#define OK(expr) CHECK_RC(expr, HUBMSG_OK)
#define INVALID(expr) CHECK_RC(expr, HUBMSG_INVALID_ARGUMENT)

#define RUN(fn)                                                                            \
    do {                                                                                   \
        current_test = #fn;                                                                \
        fn();                                                                              \
        printf("c-test ok %s\n", #fn);                                                     \
        fflush(stdout);                                                                    \
    } while (0)

static inline uint64_t mono_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

static inline void nap_ms(long ms) {
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

/* Polls `cond` every 5 ms until it holds or `limit_ms` pass; fails the test on timeout. */
#define WAIT_UNTIL(cond, limit_ms)                                                         \
    do {                                                                                   \
        uint64_t until_ = mono_ms() + (uint64_t)(limit_ms);                                \
        while (!(cond)) {                                                                  \
            if (mono_ms() > until_) FAIL_NOW("timed out after %d ms waiting for %s",       \
                                             (int)(limit_ms), #cond);                      \
            nap_ms(5);                                                                     \
        }                                                                                  \
    } while (0)

/* A directory for this test program's data: $HUBMSG_TEST_DIR/<name> (the runner removes it). */
static inline void test_dir(char *out, size_t cap, const char *name) {
    const char *base = getenv("HUBMSG_TEST_DIR");
    snprintf(out, cap, "%s/%s", base ? base : "/tmp", name);
}

/* How long waits may take: slower under valgrind (HUBMSG_SLOW=1). */
static inline int limit_ms(int normal) {
    const char *slow = getenv("HUBMSG_SLOW");
    return slow && slow[0] == '1' ? normal * 10 : normal;
}

#endif
