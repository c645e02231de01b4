/*
 * cuse_probe: the smallest CUSE server that proves, inside the scripts/vm-test guest,
 * that a CUSE device named with a sub-directory ("DEVNAME=kfdmux/kfd") appears at
 * /dev/kfdmux/kfd without udev, and that open + a restricted _IOR ioctl + close round
 * trip through a server. Speaks the /dev/cuse protocol directly (linux/fuse.h), no
 * libfuse. Used by tests/vm_smoke.rs; prints "cuse-probe: OK" and exits 0 on success.
 *
 *   cuse_probe [DEVNAME]     (default kfdmux/kfd)
 */
#include <errno.h>
#include <fcntl.h>
#include <linux/fuse.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <unistd.h>

struct version_args { uint32_t major, minor; };
#define GET_VERSION _IOR('K', 0x01, struct version_args) /* kfd's AMDKFD_IOC_GET_VERSION */

static char buf[FUSE_MIN_READ_BUFFER + 131072];

static int fail(const char *what)
{
	printf("cuse-probe: FAIL: %s: %s\n", what, strerror(errno));
	return 1;
}

/* reply = out header + up to two payload pieces, in one write() as the protocol wants */
static int reply(int fd, uint64_t unique, int error, const void *a, size_t alen,
		 const void *b, size_t blen)
{
	struct fuse_out_header oh = { .len = sizeof(oh) + alen + blen, .error = error,
				      .unique = unique };
	struct iovec iov[3] = { { &oh, sizeof(oh) }, { (void *)a, alen }, { (void *)b, blen } };
	return writev(fd, iov, 3) == (ssize_t)oh.len ? 0 : -1;
}

int main(int argc, char **argv)
{
	const char *name = argc > 1 ? argv[1] : "kfdmux/kfd";
	char devinfo[256], path[300], sysname[300];
	setvbuf(stdout, NULL, _IOLBF, 0);

	int fd = open("/dev/cuse", O_RDWR | O_CLOEXEC);
	if (fd < 0)
		return fail("open /dev/cuse");
	ssize_t n = read(fd, buf, sizeof(buf));
	if (n < (ssize_t)(sizeof(struct fuse_in_header) + sizeof(struct cuse_init_in)))
		return fail("read CUSE_INIT");
	struct fuse_in_header *ih = (struct fuse_in_header *)buf;
	struct cuse_init_in *ii = (struct cuse_init_in *)(ih + 1);
	if (ih->opcode != CUSE_INIT) {
		printf("cuse-probe: FAIL: first opcode %u, want CUSE_INIT\n", ih->opcode);
		return 1;
	}
	printf("cuse-probe: CUSE_INIT from kernel protocol %u.%u\n", ii->major, ii->minor);
	struct cuse_init_out io = { .major = FUSE_KERNEL_VERSION,
				    .minor = FUSE_KERNEL_MINOR_VERSION,
				    .max_read = 65536, .max_write = 65536 };
	int len = snprintf(devinfo, sizeof(devinfo), "DEVNAME=%s", name) + 1;
	if (reply(fd, ih->unique, 0, &io, sizeof(io), devinfo, len))
		return fail("write CUSE_INIT reply");

	/* the kernel registers the device while handling that reply; devtmpfs makes the node */
	snprintf(path, sizeof(path), "/dev/%s", name);
	struct stat st;
	int i;
	for (i = 0; i < 500 && stat(path, &st) != 0; i++)
		usleep(10000);
	if (i == 500)
		return fail(path);
	if (!S_ISCHR(st.st_mode)) {
		printf("cuse-probe: FAIL: %s is not a char device\n", path);
		return 1;
	}
	snprintf(sysname, sizeof(sysname), "/sys/class/cuse/%s", name);
	for (char *p = sysname + strlen("/sys/class/cuse/"); *p; p++)
		if (*p == '/')
			*p = '!';
	printf("cuse-probe: node %s char %u:%u, sysfs %s %s\n", path, major(st.st_rdev),
	       minor(st.st_rdev), sysname, access(sysname, F_OK) == 0 ? "present" : "MISSING");

	pid_t pid = fork();
	if (pid < 0)
		return fail("fork");
	if (pid == 0) { /* client */
		int c = open(path, O_RDWR);
		if (c < 0)
			_exit(fail("client open"));
		struct version_args v = { 0, 0 };
		if (ioctl(c, GET_VERSION, &v) != 0)
			_exit(fail("client ioctl"));
		printf("cuse-probe: client ioctl GET_VERSION -> %u.%u\n", v.major, v.minor);
		close(c);
		_exit(v.major == 1 && v.minor == 14 ? 0 : 1);
	}

	/* serve OPEN, IOCTL, RELEASE */
	int released = 0;
	while (!released) {
		n = read(fd, buf, sizeof(buf));
		if (n < (ssize_t)sizeof(*ih))
			return fail("read request");
		switch (ih->opcode) {
		case FUSE_OPEN: {
			struct fuse_open_out oo = { .fh = 1 };
			reply(fd, ih->unique, 0, &oo, sizeof(oo), NULL, 0);
			break;
		}
		case FUSE_IOCTL: {
			struct fuse_ioctl_in *in = (struct fuse_ioctl_in *)(ih + 1);
			if (in->cmd != GET_VERSION || in->out_size < sizeof(struct version_args)) {
				reply(fd, ih->unique, -ENOTTY, NULL, 0, NULL, 0);
				break;
			}
			struct fuse_ioctl_out out = { .result = 0 };
			struct version_args v = { 1, 14 };
			reply(fd, ih->unique, 0, &out, sizeof(out), &v, sizeof(v));
			break;
		}
		case FUSE_RELEASE:
			reply(fd, ih->unique, 0, NULL, 0, NULL, 0);
			released = 1;
			break;
		default:
			reply(fd, ih->unique, -ENOSYS, NULL, 0, NULL, 0);
		}
	}
	int status;
	waitpid(pid, &status, 0);
	if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
		printf("cuse-probe: FAIL: client status 0x%x\n", status);
		return 1;
	}
	close(fd); /* server gone: the kernel removes the device and its node */
	for (i = 0; i < 500 && access(path, F_OK) == 0; i++)
		usleep(10000);
	printf("cuse-probe: after server exit %s is %s\n", path, i == 500 ? "still there" : "gone");
	printf("cuse-probe: OK\n");
	return 0;
}
