/* Shared by the C examples: error handling and the "demo mode" that runs a hub inside the
 * example's own process (in a temporary directory) when no connection string is given. */
#ifndef HUBMSG_EXAMPLE_H
#define HUBMSG_EXAMPLE_H

#define _XOPEN_SOURCE 700 /* mkdtemp, nftw */
#include <ftw.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "hubmsg.h"

/* Exits with the result name and hubmsg's last error when `expr` fails. */
#define TRY(expr)                                                                                 \
    do {                                                                                          \
        hubmsg_result rc_ = (expr);                                                               \
        if (rc_ < 0) {                                                                            \
            fprintf(stderr, "%s:%d: %s failed: %s\n  %s\n", __FILE__, __LINE__, #expr,            \
                    hubmsg_result_str(rc_), hubmsg_last_error_message());                         \
            exit(1);                                                                              \
        }                                                                                         \
    } while (0)

/* A demo: a temporary directory and (optionally) an embedded hub in it. */
typedef struct {
    char dir[64];
    char path[128];
    hubmsg_hub *hub;
} demo;

/* Makes the temporary directory and starts a hub in it on 127.0.0.1, port 0, with C2D feedback
 * batched every 200 ms. */
static inline void demo_start(demo *d) {
    snprintf(d->dir, sizeof d->dir, "%s/hubmsg-example-XXXXXX", getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp");
    if (!mkdtemp(d->dir)) {
        perror("mkdtemp");
        exit(1);
    }
    snprintf(d->path, sizeof d->path, "%s/hub", d->dir);
    hubmsg_hub_options *opts = NULL;
    TRY(hubmsg_hub_options_new(d->path, &opts));
    TRY(hubmsg_hub_options_set_listen(opts, "127.0.0.1:0"));
    TRY(hubmsg_hub_options_set_feedback_interval(opts, 200)); /* IoT Hub batches every 15 s */
    TRY(hubmsg_hub_start_with(opts, &d->hub));
    hubmsg_hub_options_free(opts);
    printf("demo mode: embedded hub on %s (data in %s)\n", hubmsg_hub_address(d->hub), d->dir);
}

/* A path inside the demo directory (valid until the next call). */
static inline const char *demo_path(demo *d, const char *name) {
    snprintf(d->path, sizeof d->path, "%s/%s", d->dir, name);
    return d->path;
}

static int remove_entry(const char *path, const struct stat *st, int flag, struct FTW *ftw) {
    (void)st, (void)flag, (void)ftw;
    return remove(path);
}

/* Stops the hub and removes the temporary directory. */
static inline void demo_stop(demo *d) {
    hubmsg_hub_free(d->hub);
    d->hub = NULL;
    if (d->dir[0]) nftw(d->dir, remove_entry, 16, FTW_DEPTH | FTW_PHYS);
}

/* Registers `device_id` on the demo hub; returns its connection string (hubmsg_string_free). */
static inline char *demo_device(demo *d, const char *device_id) {
    char *cs = NULL;
    TRY(hubmsg_hub_create_device(d->hub, device_id, &cs));
    return cs;
}

#endif
