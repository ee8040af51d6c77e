/* timewrap: stands in for a binary (runc, berth-shim) during the bench's traced run and records
 * when each invocation started and ended, so the stage breakdown can place the OCI runtime and
 * the shim spawn on the same clock as the OTLP spans (CLOCK_REALTIME, ns).
 *
 * Built by bench/run.sh with the real binary and the log file compiled in:
 *   cc -O2 -DREAL='"/usr/sbin/runc"' -DLOG='"/tmp/x/exec.log"' -DNAME='"runc"' -o runc timewrap.c
 *
 * One line per invocation: NAME START_NS END_NS STATUS ARGS... (args separated by spaces).
 * fork + exec + wait costs ~1 ms; the traced run reports its own end-to-end time so that
 * overhead is visible. The child keeps every inherited descriptor; the wrapper exits with the
 * child's status (128 + signal when it was killed).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static long long now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_REALTIME, &t);
    return (long long)t.tv_sec * 1000000000LL + t.tv_nsec;
}

static pid_t child;

static void forward(int sig) {
    if (child > 0) kill(child, sig);
}

int main(int argc, char **argv) {
    long long t0 = now_ns();
    child = fork();
    if (child < 0) {
        perror("timewrap: fork");
        return 127;
    }
    if (child == 0) {
        argv[0] = REAL;
        execv(REAL, argv);
        perror("timewrap: exec " REAL);
        _exit(127);
    }
    signal(SIGTERM, forward);
    signal(SIGINT, forward);
    signal(SIGHUP, forward);
    int st = 0;
    while (waitpid(child, &st, 0) < 0 && errno == EINTR) {
    }
    long long t1 = now_ns();
    int code = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);

    char line[8192];
    int n = snprintf(line, sizeof line, "%s %lld %lld %d", NAME, t0, t1, code);
    for (int i = 1; i < argc && n < (int)sizeof line - 2; i++) {
        n += snprintf(line + n, sizeof line - n, " %s", argv[i]);
    }
    if (n > (int)sizeof line - 2) n = sizeof line - 2;
    line[n++] = '\n';
    int fd = open(LOG, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0644);
    if (fd >= 0) {
        /* One write with O_APPEND: lines from concurrent invocations do not interleave. */
        ssize_t w = write(fd, line, n);
        (void)w;
        close(fd);
    }
    return code;
}
