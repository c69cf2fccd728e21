/* Fault injection for tests: an LD_PRELOAD library that makes pread fail or come up short on
 * one file, as failing storage does. Not part of edgemoe; tests/test_faults.py builds it.
 *
 * EDGEMOE_FAULT_CONTROL names a control file, read on every pread. It holds one line:
 *   MODE SUFFIX [BEGIN END]
 * MODE: "eio" (fail with EIO) or "short" (return half of what was asked, at least one byte);
 * anything else, or no file, passes reads through. SUFFIX: reads of a file whose path ends with
 * it are affected. BEGIN END: only reads overlapping bytes [BEGIN, END) (default: all).
 * Each affected read appends one byte to CONTROL.hits, so a test can tell the fault happened. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <unistd.h>

typedef ssize_t (*pread_fn)(int, void *, size_t, off_t);

static ssize_t faulty(pread_fn real, int fd, void *buf, size_t count, off_t offset) {
  const char *control = getenv("EDGEMOE_FAULT_CONTROL");
  char mode[16] = "", suffix[256] = "";
  long long begin = 0, end = -1;
  if (control) {
    const int saved = errno;
    FILE *f = fopen(control, "re");
    if (f) {
      if (fscanf(f, "%15s %255s %lld %lld", mode, suffix, &begin, &end) < 2) mode[0] = '\0';
      fclose(f);
    }
    errno = saved;
  }
  if (mode[0] && suffix[0]) {
    char link[64], path[4096];
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    const ssize_t n = readlink(link, path, sizeof path - 1);
    const size_t len = strlen(suffix);
    const int overlaps = (end < 0 || (long long)offset < end) && (long long)(offset + (off_t)count) > begin;
    if (n >= (ssize_t)len && overlaps) {
      path[n] = '\0';
      if (strcmp(path + n - len, suffix) == 0) {
        char hits[4200];
        snprintf(hits, sizeof hits, "%s.hits", control);
        FILE *h = fopen(hits, "ae");
        if (h) {
          fputc('.', h);
          fclose(h);
        }
        if (strcmp(mode, "eio") == 0) {
          errno = EIO;
          return -1;
        }
        if (strcmp(mode, "short") == 0 && count > 1) count /= 2;
      }
    }
  }
  return real(fd, buf, count, offset);
}

ssize_t pread(int fd, void *buf, size_t count, off_t offset) {
  static pread_fn real;
  if (!real) real = (pread_fn)dlsym(RTLD_NEXT, "pread");
  return faulty(real, fd, buf, count, offset);
}

ssize_t pread64(int fd, void *buf, size_t count, off_t offset) {
  static pread_fn real;
  if (!real) real = (pread_fn)dlsym(RTLD_NEXT, "pread64");
  return faulty(real, fd, buf, count, offset);
}
