/* A kfdmux client for fds going out of ioctls (EXPORT_DMABUF, SMI_EVENTS); used on the host
 * (FUSE) and in the CUSE VM.
 *
 *   kfd_fd_client KFD RENDER noch
 *     Both ioctls must fail with EOPNOTSUPP (no fd channel: FUSE, or CUSE without the preload
 *     library). Prints "NO-CHANNEL EOPNOTSUPP" and exits 0.
 *   kfd_fd_client KFD RENDER fds
 *     Under the preload library on CUSE: ALLOC (GTT) + EXPORT_DMABUF gives a real fd (fstat,
 *     FD_CLOEXEC as asked, size); a second context of the same daemon (second opens of KFD and
 *     RENDER) takes it in GET_DMABUF_INFO (size, gpu) and IMPORT_DMABUF; SMI_EVENTS gives an
 *     fd that takes an 8-byte mask write, polls without POLLIN and reads EAGAIN (no events
 *     queued). Prints "dmabuf content same|differs" (the bytes written through the buffer's
 *     mapping before the export, found in the dma-buf or not) and "FDS OK", exit 0.
 *   kfd_fd_client KFD RENDER park N READY GO
 *     Announces the channel and issues N EXPORT_DMABUF + 1 SMI_EVENTS with raw system calls
 *     (past the preload library), so N+1 fds stay parked in the daemon and are never fetched;
 *     creates READY, waits for GO, exits. The caller counts the daemon's fds meanwhile.
 * Any failure prints "FAIL ..." and exits 1.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

/* The KFD ABI items used (from the kernel's uapi kfd_ioctl.h). */
struct kfd_process_device_apertures {
	uint64_t lds_base, lds_limit, scratch_base, scratch_limit, gpuvm_base, gpuvm_limit;
	uint32_t gpu_id, pad;
};
struct apertures_args { uint64_t ptr; uint32_t num_of_nodes, pad; };
struct acquire_vm_args { uint32_t drm_fd, gpu_id; };
struct alloc_args { uint64_t va_addr, size, handle, mmap_offset; uint32_t gpu_id, flags; };
struct export_args { uint64_t handle; uint32_t flags, dmabuf_fd; };
struct import_args { uint64_t va_addr, handle; uint32_t gpu_id, dmabuf_fd; };
struct info_args { uint64_t size, metadata_ptr; uint32_t metadata_size, gpu_id, flags, dmabuf_fd; };
struct smi_args { uint32_t gpuid, anon_fd; };
#define GET_PROCESS_APERTURES_NEW _IOWR('K', 0x14, struct apertures_args)
#define ACQUIRE_VM _IOW('K', 0x15, struct acquire_vm_args)
#define ALLOC_MEMORY_OF_GPU _IOWR('K', 0x16, struct alloc_args)
#define GET_DMABUF_INFO _IOWR('K', 0x1C, struct info_args)
#define IMPORT_DMABUF _IOWR('K', 0x1D, struct import_args)
#define SMI_EVENTS _IOWR('K', 0x1F, struct smi_args)
#define EXPORT_DMABUF _IOWR('K', 0x24, struct export_args)
#define GTT (1u << 1)
#define WRITABLE (1u << 31)
#define KFDMUX_IOC_FD_CHANNEL _IO('K', 0xF1)
#define BUF 8192

static int fail(const char *what)
{
	printf("FAIL %s: %s (errno %d)\n", what, strerror(errno), errno);
	exit(1);
}

struct ctx { int kfd, render; uint32_t gpu; uint64_t va; };

static struct ctx open_ctx(const char *kfd, const char *render)
{
	struct ctx c;
	c.kfd = open(kfd, O_RDWR | O_CLOEXEC);
	if (c.kfd < 0)
		fail("open KFD");
	c.render = open(render, O_RDWR | O_CLOEXEC);
	if (c.render < 0)
		fail("open RENDER");
	struct kfd_process_device_apertures ap[8];
	memset(ap, 0, sizeof(ap));
	struct apertures_args pa = { .ptr = (uintptr_t)ap, .num_of_nodes = 8 };
	if (ioctl(c.kfd, GET_PROCESS_APERTURES_NEW, &pa) != 0 || pa.num_of_nodes < 1)
		fail("GET_PROCESS_APERTURES_NEW");
	c.gpu = ap[0].gpu_id;
	c.va = ap[0].gpuvm_base ? ap[0].gpuvm_base + 0x100000 : 0x200000000ull;
	struct acquire_vm_args acq = { .drm_fd = c.render, .gpu_id = c.gpu };
	if (ioctl(c.kfd, ACQUIRE_VM, &acq) != 0)
		fail("ACQUIRE_VM");
	return c;
}

static struct alloc_args alloc_gtt(struct ctx *c)
{
	struct alloc_args al = { .va_addr = c->va, .size = BUF, .gpu_id = c->gpu, .flags = GTT | WRITABLE };
	c->va += 0x100000;
	if (ioctl(c->kfd, ALLOC_MEMORY_OF_GPU, &al) != 0)
		fail("ALLOC_MEMORY_OF_GPU");
	return al;
}

static int no_channel(struct ctx *c)
{
	struct alloc_args al = alloc_gtt(c);
	struct export_args ex = { .handle = al.handle, .flags = O_RDWR | O_CLOEXEC, .dmabuf_fd = 12345 };
	errno = 0;
	if (ioctl(c->kfd, EXPORT_DMABUF, &ex) == 0 || errno != EOPNOTSUPP) {
		printf("FAIL EXPORT_DMABUF without a channel: errno %d, fd %u\n", errno, ex.dmabuf_fd);
		return 1;
	}
	struct smi_args smi = { .gpuid = c->gpu };
	errno = 0;
	if (ioctl(c->kfd, SMI_EVENTS, &smi) == 0 || errno != EOPNOTSUPP) {
		printf("FAIL SMI_EVENTS without a channel: errno %d\n", errno);
		return 1;
	}
	printf("NO-CHANNEL EOPNOTSUPP\n");
	return 0;
}

static int fds(struct ctx *c, const char *kfd, const char *render)
{
	struct alloc_args al = alloc_gtt(c);
	static const char bytes[] = "dma-buf bytes";
	char *p = mmap(NULL, BUF, PROT_READ | PROT_WRITE, MAP_SHARED, c->kfd, al.mmap_offset);
	if (p == MAP_FAILED)
		fail("mmap of the buffer");
	memcpy(p, bytes, sizeof(bytes));
	struct export_args ex = { .handle = al.handle, .flags = O_RDWR | O_CLOEXEC };
	if (ioctl(c->kfd, EXPORT_DMABUF, &ex) != 0)
		fail("EXPORT_DMABUF");
	int fd = (int)ex.dmabuf_fd;
	struct stat st;
	if (fstat(fd, &st) != 0)
		fail("fstat of the dma-buf fd");
	int fl = fcntl(fd, F_GETFD);
	printf("dmabuf fd %d size %lld cloexec %d\n", fd, (long long)st.st_size, fl & FD_CLOEXEC);
	if (!(fl & FD_CLOEXEC))
		return printf("FAIL O_CLOEXEC asked, FD_CLOEXEC not set\n"), 1;
	char got[sizeof(bytes)] = { 0 };
	ssize_t n = pread(fd, got, sizeof(got), 0);
	printf("dmabuf content %s\n", n == (ssize_t)sizeof(got) && !memcmp(got, bytes, sizeof(got)) ? "same" : "differs");

	struct ctx b = open_ctx(kfd, render);
	struct info_args inf = { .dmabuf_fd = fd };
	if (ioctl(b.kfd, GET_DMABUF_INFO, &inf) != 0)
		fail("GET_DMABUF_INFO in a second context");
	printf("info size %llu gpu %#x flags %#x\n", (unsigned long long)inf.size, inf.gpu_id, inf.flags);
	if (inf.size != BUF || inf.gpu_id != c->gpu)
		return printf("FAIL GET_DMABUF_INFO: size %llu gpu %#x\n", (unsigned long long)inf.size, inf.gpu_id), 1;
	struct import_args im = { .va_addr = b.va + 0x1000000, .gpu_id = b.gpu, .dmabuf_fd = fd };
	if (ioctl(b.kfd, IMPORT_DMABUF, &im) != 0)
		fail("IMPORT_DMABUF in a second context");
	printf("imported handle %#llx\n", (unsigned long long)im.handle);

	struct smi_args smi = { .gpuid = c->gpu };
	if (ioctl(c->kfd, SMI_EVENTS, &smi) != 0)
		fail("SMI_EVENTS");
	int sfd = (int)smi.anon_fd;
	if (fstat(sfd, &st) != 0)
		fail("fstat of the SMI fd");
	if (fcntl(sfd, F_GETFD) & FD_CLOEXEC)
		return printf("FAIL SMI fd is close-on-exec (anon_inode_getfd(O_RDWR) is not)\n"), 1;
	uint64_t mask = ~0ull;
	if (write(sfd, &mask, 8) != 8)
		fail("SMI mask write");
	struct pollfd pf = { .fd = sfd, .events = POLLIN };
	int pr = poll(&pf, 1, 100);
	char rb[256];
	errno = 0;
	ssize_t rn = read(sfd, rb, sizeof(rb));
	printf("smi fd %d poll %d revents %#x read %zd errno %d\n", sfd, pr, pf.revents, rn, errno);
	if (pr != 0 || rn != -1 || errno != EAGAIN)
		return printf("FAIL SMI fd: want no event queued (poll 0, read EAGAIN)\n"), 1;
	close(sfd);
	close(fd);
	printf("FDS OK\n");
	return 0;
}

static int park(struct ctx *c, int n, const char *ready, const char *go)
{
	/* Raw system calls: the preload library (if any) must not fetch these. */
	if (syscall(SYS_ioctl, c->kfd, KFDMUX_IOC_FD_CHANNEL, 0) != 0)
		fail("KFDMUX_IOC_FD_CHANNEL");
	for (int i = 0; i < n; i++) {
		struct alloc_args al = alloc_gtt(c);
		struct export_args ex = { .handle = al.handle, .flags = O_RDWR };
		if (syscall(SYS_ioctl, c->kfd, EXPORT_DMABUF, &ex) != 0)
			fail("raw EXPORT_DMABUF");
	}
	struct smi_args smi = { .gpuid = c->gpu };
	if (syscall(SYS_ioctl, c->kfd, SMI_EVENTS, &smi) != 0)
		fail("raw SMI_EVENTS");
	printf("PARKED %d\n", n + 1);
	close(open(ready, O_CREAT | O_WRONLY | O_CLOEXEC, 0644));
	for (int i = 0; i < 600 && access(go, F_OK) != 0; i++)
		usleep(50000);
	return 0;
}

int main(int argc, char **argv)
{
	alarm(60);
	setvbuf(stdout, NULL, _IONBF, 0);
	if (argc < 4) {
		fprintf(stderr, "usage: %s KFD RENDER noch|fds|park N READY GO\n", argv[0]);
		return 1;
	}
	struct ctx c = open_ctx(argv[1], argv[2]);
	if (!strcmp(argv[3], "noch"))
		return no_channel(&c);
	if (!strcmp(argv[3], "fds"))
		return fds(&c, argv[1], argv[2]);
	if (!strcmp(argv[3], "park") && argc == 7)
		return park(&c, atoi(argv[4]), argv[5], argv[6]);
	fprintf(stderr, "unknown mode %s\n", argv[3]);
	return 1;
}
