/* The bench's pod infrastructure process for containerd's CRI: what Kubernetes' pause image
 * runs (sleep until told to stop, reap adopted children), so containerd's per-pod memory is
 * measured with a pause of the real size rather than critest's stand-in shell.
 * Built static by bench/lib/pause_image.py. */
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

static void stop(int sig) { _exit(sig == SIGINT ? 1 : 0); }

static void reap(int sig) {
  (void)sig;
  while (waitpid(-1, 0, WNOHANG) > 0) {
  }
}

int main(void) {
  struct sigaction sa = {0};
  sa.sa_handler = stop;
  sigaction(SIGINT, &sa, 0);
  sigaction(SIGTERM, &sa, 0);
  sa.sa_handler = reap;
  sa.sa_flags = SA_NOCLDSTOP;
  sigaction(SIGCHLD, &sa, 0);
  for (;;) pause();
}
