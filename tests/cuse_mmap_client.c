/* A small kfdmux client for the mmap tests (host FUSE and the CUSE VM).
 *
 *   cuse_mmap_client KFD RENDER [SOCKET]
 *     Opens KFD and RENDER, finds the first GPU (GET_PROCESS_APERTURES_NEW), ACQUIRE_VM,
 *     allocates a 2-page GTT buffer and mmaps it through KFD and through RENDER (on CUSE that
 *     needs the preload library). With SOCKET it also fetches the process memfd through the
 *     hand-over protocol itself (token ioctl on KFD, then the socket) and maps it at the same
 *     offset. It writes through each mapping and checks every other sees it.
 *     Prints "mmap-errno N" and exits 2 when the device mmap fails, prints "COHERENT" and
 *     exits 0 on success, exits 3 on incoherence, 1 on any other failure.
 *   Also: in a forked child (not the opener), mmap of KFD must fail (exit 4 if it works
 *   through the hand-over, as that would be another process's pages).
 *
 *   cuse_mmap_client --plain FILE
 *     Checks that ordinary mmaps are untouched: FILE (a regular file) maps and reads back its
 *     first byte, /dev/null still fails with ENODEV, anonymous memory works. Exit 0 or 1.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

/* The few KFD ABI items used (from the kernel's uapi kfd_ioctl.h, declared here so the client
 * builds without kernel or libdrm headers, e.g. inside the test VM). */
struct kfd_process_device_apertures {
	uint64_t lds_base, lds_limit, scratch_base, scratch_limit, gpuvm_base, gpuvm_limit;
	uint32_t gpu_id, pad;
};
struct kfd_ioctl_get_process_apertures_new_args {
	uint64_t kfd_process_device_apertures_ptr;
	uint32_t num_of_nodes, pad;
};
struct kfd_ioctl_acquire_vm_args {
	uint32_t drm_fd, gpu_id;
};
struct kfd_ioctl_alloc_memory_of_gpu_args {
	uint64_t va_addr, size, handle, mmap_offset;
	uint32_t gpu_id, flags;
};
#define AMDKFD_IOC_GET_PROCESS_APERTURES_NEW _IOWR('K', 0x14, struct kfd_ioctl_get_process_apertures_new_args)
#define AMDKFD_IOC_ACQUIRE_VM _IOW('K', 0x15, struct kfd_ioctl_acquire_vm_args)
#define AMDKFD_IOC_ALLOC_MEMORY_OF_GPU _IOWR('K', 0x16, struct kfd_ioctl_alloc_memory_of_gpu_args)
#define KFD_IOC_ALLOC_MEM_FLAGS_GTT (1u << 1)
#define KFD_IOC_ALLOC_MEM_FLAGS_WRITABLE (1u << 31)

#define KFDMUX_IOC_HANDOVER_TOKEN _IOR('K', 0xF0, uint64_t)
#define BUF_SIZE 8192

static int fail(const char *what)
{
	printf("FAIL %s: %s (errno %d)\n", what, strerror(errno), errno);
	return 1;
}

static int plain(const char *file)
{
	int fd = open(file, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return fail("open FILE");
	char *p = mmap(NULL, 4096, PROT_READ, MAP_SHARED, fd, 0);
	if (p == MAP_FAILED)
		return fail("mmap FILE");
	printf("file first byte %c\n", p[0]);
	munmap(p, 4096);
	close(fd);
	fd = open("/dev/null", O_RDWR | O_CLOEXEC);
	if (fd < 0)
		return fail("open /dev/null");
	errno = 0;
	p = mmap(NULL, 4096, PROT_READ, MAP_SHARED, fd, 0);
	if (p != MAP_FAILED || errno != ENODEV) {
		printf("FAIL /dev/null mmap gave %p errno %d, want ENODEV\n", (void *)p, errno);
		return 1;
	}
	printf("/dev/null ENODEV\n");
	close(fd);
	p = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (p == MAP_FAILED)
		return fail("anonymous mmap");
	p[0] = 1;
	munmap(p, 4096);
	printf("PLAIN OK\n");
	return 0;
}

/* The hand-over protocol, client side: returns the memfd or -1. */
static int fetch_memfd(int kfd, const char *sock)
{
	uint64_t token = 0;
	if (ioctl(kfd, KFDMUX_IOC_HANDOVER_TOKEN, &token) != 0) {
		fail("token ioctl");
		return -1;
	}
	int s = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	strncpy(sa.sun_path, sock, sizeof(sa.sun_path) - 1);
	if (s < 0 || connect(s, (struct sockaddr *)&sa, sizeof(sa)) != 0) {
		fail("connect");
		return -1;
	}
	if (send(s, &token, 8, MSG_NOSIGNAL) != 8) {
		fail("send");
		return -1;
	}
	unsigned char status = 0xff;
	union {
		char buf[CMSG_SPACE(sizeof(int))];
		struct cmsghdr align;
	} u;
	struct iovec iov = { .iov_base = &status, .iov_len = 1 };
	struct msghdr msg = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = u.buf, .msg_controllen = sizeof(u.buf) };
	ssize_t n = recvmsg(s, &msg, MSG_CMSG_CLOEXEC);
	close(s);
	struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
	if (n != 1 || status != 0 || !c || c->cmsg_type != SCM_RIGHTS) {
		printf("FAIL hand-over: %zd bytes, status %u\n", n, status);
		return -1;
	}
	int fd;
	memcpy(&fd, CMSG_DATA(c), sizeof(fd));
	return fd;
}

static int check(volatile uint32_t *w, volatile uint32_t *r, uint32_t v, const char *what)
{
	for (int i = 0; i < BUF_SIZE / 4; i += 256)
		w[i] = v + i;
	for (int i = 0; i < BUF_SIZE / 4; i += 256)
		if (r[i] != v + i) {
			printf("INCOHERENT %s: word %d is %#x, want %#x\n", what, i, r[i], v + i);
			return 0;
		}
	printf("coherent %s\n", what);
	return 1;
}

int main(int argc, char **argv)
{
	alarm(30);
	setvbuf(stdout, NULL, _IONBF, 0);
	if (argc == 3 && strcmp(argv[1], "--plain") == 0)
		return plain(argv[2]);
	if (argc < 3) {
		fprintf(stderr, "usage: %s KFD RENDER [SOCKET] | --plain FILE\n", argv[0]);
		return 1;
	}
	int kfd = open(argv[1], O_RDWR | O_CLOEXEC);
	if (kfd < 0)
		return fail("open KFD");
	int render = open(argv[2], O_RDWR | O_CLOEXEC);
	if (render < 0)
		return fail("open RENDER");

	struct kfd_process_device_apertures ap[8];
	memset(ap, 0, sizeof(ap));
	struct kfd_ioctl_get_process_apertures_new_args pa = {
		.kfd_process_device_apertures_ptr = (uintptr_t)ap, .num_of_nodes = 8 };
	if (ioctl(kfd, AMDKFD_IOC_GET_PROCESS_APERTURES_NEW, &pa) != 0 || pa.num_of_nodes < 1)
		return fail("GET_PROCESS_APERTURES_NEW");
	uint32_t gpu_id = ap[0].gpu_id;
	struct kfd_ioctl_acquire_vm_args acq = { .drm_fd = render, .gpu_id = gpu_id };
	if (ioctl(kfd, AMDKFD_IOC_ACQUIRE_VM, &acq) != 0)
		return fail("ACQUIRE_VM");
	struct kfd_ioctl_alloc_memory_of_gpu_args al = {
		.va_addr = ap[0].gpuvm_base ? ap[0].gpuvm_base + 0x100000 : 0x200000000ull,
		.size = BUF_SIZE, .gpu_id = gpu_id,
		.flags = KFD_IOC_ALLOC_MEM_FLAGS_GTT | KFD_IOC_ALLOC_MEM_FLAGS_WRITABLE };
	if (ioctl(kfd, AMDKFD_IOC_ALLOC_MEMORY_OF_GPU, &al) != 0)
		return fail("ALLOC_MEMORY_OF_GPU");
	printf("gpu %#x handle %#llx mmap_offset %#llx\n", gpu_id, (unsigned long long)al.handle,
	       (unsigned long long)al.mmap_offset);

	errno = 0;
	uint32_t *via_kfd = mmap(NULL, BUF_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, kfd, al.mmap_offset);
	if (via_kfd == MAP_FAILED) {
		printf("mmap-errno %d\n", errno);
		return 2;
	}
	uint32_t *via_render = mmap(NULL, BUF_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, render, al.mmap_offset);
	if (via_render == MAP_FAILED)
		return fail("mmap RENDER");
	int ok = check(via_kfd, via_render, 0x1000, "kfd->render") &&
		 check(via_render, via_kfd, 0x2000, "render->kfd");
	if (ok && argc > 3) {
		int memfd = fetch_memfd(kfd, argv[3]);
		if (memfd < 0)
			return 1;
		uint32_t *via_memfd = mmap(NULL, BUF_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, memfd, al.mmap_offset);
		if (via_memfd == MAP_FAILED)
			return fail("mmap memfd");
		close(memfd);
		ok = check(via_kfd, via_memfd, 0x3000, "kfd->memfd") &&
		     check(via_memfd, via_kfd, 0x4000, "memfd->kfd");
	}
	if (!ok)
		return 3;

	/* A child is not the opener: it must not get a mapping through the hand-over. */
	pid_t pid = fork();
	if (pid == 0) {
		void *p = mmap(NULL, BUF_SIZE, PROT_READ, MAP_SHARED, kfd, al.mmap_offset);
		_exit(p == MAP_FAILED ? 0 : 4);
	}
	int st = 0;
	waitpid(pid, &st, 0);
	printf("child mmap %s\n", WIFEXITED(st) && WEXITSTATUS(st) == 0 ? "refused" : "MAPPED");
	if (!WIFEXITED(st) || WEXITSTATUS(st) != 0) {
		/* On a FUSE file with passthrough, the inherited fd maps the parent's own backing
		 * file, which the child shares anyway after fork; only the hand-over must refuse. */
		if (getenv("EXPECT_CHILD_REFUSED"))
			return 4;
	}
	printf("COHERENT\n");
	return 0;
}
