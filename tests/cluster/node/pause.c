/* The pod sandbox's process, and PID 1 of the e2e node's namespaces: it sleeps until
 * SIGTERM or SIGINT and reaps the orphans that land on it (a PID 1 gets no default
 * signal actions, so both are handled). Built static: the images hold nothing else. */
#include <signal.h>
#include <stddef.h>
#include <sys/wait.h>
#include <unistd.h>

static void stop(int sig) { (void)sig; _exit(0); }

static void reap(int sig) {
  (void)sig;
  while (waitpid(-1, NULL, WNOHANG) > 0) {
  }
}

int main(void) {
  struct sigaction quit = {.sa_handler = stop}, child = {.sa_handler = reap, .sa_flags = SA_NOCLDSTOP};
  sigaction(SIGTERM, &quit, NULL);
  sigaction(SIGINT, &quit, NULL);
  sigaction(SIGCHLD, &child, NULL);
  for (;;) pause();
}
