/* Holds a kfdmux device open while the daemon is killed: GET_VERSION works, then (after the
 * caller has killed the daemon) the same ioctl must fail promptly with ENOTCONN or ENODEV.
 * Usage: kill_client DEVICE READY_FILE GO_FILE */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <time.h>
#include <unistd.h>

struct version { uint32_t major, minor; };
#define GET_VERSION _IOR('K', 0x01, struct version)

static double now(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return t.tv_sec + t.tv_nsec / 1e9;
}

int main(int argc, char **argv)
{
	if (argc != 4) {
		fprintf(stderr, "usage: %s DEVICE READY_FILE GO_FILE\n", argv[0]);
		return 2;
	}
	int fd = open(argv[1], O_RDWR | O_CLOEXEC);
	if (fd < 0) {
		printf("FAIL open: %s\n", strerror(errno));
		return 1;
	}
	struct version v = {0};
	if (ioctl(fd, GET_VERSION, &v) < 0) {
		printf("FAIL first GET_VERSION: %s\n", strerror(errno));
		return 1;
	}
	printf("before kill: version %u.%u\n", v.major, v.minor);
	fflush(stdout);
	close(open(argv[2], O_CREAT | O_WRONLY, 0644));
	for (int i = 0; i < 3000 && access(argv[3], F_OK) != 0; i++)
		usleep(10000);
	double t0 = now();
	int r = ioctl(fd, GET_VERSION, &v);
	int e = errno;
	double dt = now() - t0;
	printf("after kill: r=%d errno=%d (%s) in %.3f s\n", r, r < 0 ? e : 0, r < 0 ? strerror(e) : "-", dt);
	if (r < 0 && (e == ENOTCONN || e == ENODEV)) {
		printf("DEAD-DAEMON-OK\n");
		return 0;
	}
	return 1;
}
