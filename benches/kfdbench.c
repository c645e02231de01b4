/*
 * kfdbench: the client side of scripts/bench. Measures the round trip of one operation —
 * a pipe ping-pong, an ioctl on a FUSE peer's file, or a KFD ioctl on a kfdmux file — from
 * 1..n client processes (or threads), and prints one line of key=value figures.
 *
 * usage: kfdbench MODE [options] [PATH]
 *   MODE   pipepp            ping-pong of one byte with an echo process over two pipes
 *          pvmr, pvmw        process_vm_readv / process_vm_writev of -s bytes (default 32) in
 *                            another process: what kfdmux pays per pointer array
 *          fioc   PATH       _IOR('E', 0, size_t) on a FUSE peer's file (8 bytes out)
 *          version PATH      AMDKFD_IOC_GET_VERSION on a kfd file (flat, 8 bytes out)
 *          clock  PATH       AMDKFD_IOC_GET_CLOCK_COUNTERS (flat, 40 bytes in/out)
 *          map8   PATH       MAP_MEMORY_TO_GPU and UNMAP_MEMORY_FROM_GPU of one buffer on 8
 *                            GPUs, alternately; each is one op (pointer: 8 device ids)
 *          wait64 PATH       WAIT_EVENTS, wait_for_all, on 64 signalled manual-reset events
 *                            (pointer: 64 kfd_event_data in and out)
 *          cycle  PATH       ALLOC (64 KiB VRAM) + MAP + UNMAP + FREE: one op = 4 ioctls
 *          hold   PATH       opens -c idle contexts plus one whose WAIT_EVENTS blocks with an
 *                            infinite timeout; prints "ready" and stays until killed
 *          scale  PATH       opens -c contexts at once, prints the open time, waits for a line
 *                            on stdin (the harness reads the daemon's memory), closes them all
 *                            and waits until the daemon's stats file shows them released
 *   -n N      ops per client in each pass (default 50000)
 *   -t C      clients (default 1); each opens its own fd, i.e. its own context
 *   -T        clients are threads of one process (default: processes); even with -t 1 the
 *             ioctls then come from a thread that is not the thread-group leader
 *   -a CPUS   pin client i to CPUS[i % len] (comma list); -b CPU pins pipepp's echo process
 *   -c COUNT  contexts for hold/scale (default 100 / 10000)
 *   -g GPUS   GPUs to map to in map8 (default 8)
 *   -s BYTES  size for pvmr/pvmw (default 32, at most 65536)
 *
 * Method: 2000 warm-up ops; a barrier; an untimed pass of N ops per client (ops_s: C*N over
 * the time from the first start to the last end); a barrier; a timed pass of N ops per client
 * with a CLOCK_MONOTONIC pair around each op (p50/p90/p99/p99.9/max/mean over all clients).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <libgen.h>
#include <linux/kfd_ioctl.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define FIOC_GET _IOR('E', 0, size_t)
#define MAXGPU 16
#define NEVENTS 64

enum mode { M_PIPEPP, M_PVMR, M_PVMW, M_FIOC, M_VERSION, M_CLOCK, M_MAP8, M_WAIT64, M_CYCLE,
	    M_HOLD, M_SCALE };
static const char *mode_names[] = { "pipepp", "pvmr", "pvmw", "fioc", "version", "clock",
				    "map8", "wait64", "cycle", "hold", "scale" };

static enum mode mode;
static long N = 50000;
static int nclients = 1, use_threads, ngpus_map = 8, count = -1;
static size_t pvm_bytes = 32;
static char pvm_local[65536], pvm_remote[65536];
static int cpus[64], ncpus, echo_cpu = -1;
static const char *path;
static char dir[4096];

struct shared {
	pthread_barrier_t bar;
	struct {
		uint64_t t0[2], t1[2];
		long errs;
		int err_no;
		char what[96];
	} cl[];
};
static struct shared *sh;
static uint32_t *lat;

/* Per-client state of the KFD modes. */
struct kctx {
	int fd;
	uint32_t gpus[MAXGPU];
	int ngpus;
	int render[MAXGPU];
	uint64_t handle, va;
	struct kfd_event_data ev[NEVENTS];
	long iter;
	int ppw, ppr; /* pipepp */
	pid_t peer;   /* pipepp's echo process, pvm's target */
};

static uint64_t now_ns(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return (uint64_t)t.tv_sec * 1000000000u + (uint64_t)t.tv_nsec;
}

static void pin(int cpu)
{
	cpu_set_t s;
	CPU_ZERO(&s);
	CPU_SET(cpu, &s);
	if (sched_setaffinity(0, sizeof(s), &s))
		perror("sched_setaffinity");
}

static void die(const char *what)
{
	fprintf(stderr, "kfdbench: %s: %s\n", what, strerror(errno));
	exit(2);
}

static int open_kfd(void)
{
	int fd = open(path, O_RDWR | O_CLOEXEC);
	if (fd < 0)
		die(path);
	return fd;
}

/* GPU ids from GET_PROCESS_APERTURES_NEW (itself a pointer ioctl). */
static int gpu_ids(int fd, uint32_t *ids)
{
	struct kfd_process_device_apertures ap[MAXGPU];
	struct kfd_ioctl_get_process_apertures_new_args a = { 0 };
	memset(ap, 0, sizeof(ap));
	a.kfd_process_device_apertures_ptr = (uintptr_t)ap;
	a.num_of_nodes = MAXGPU;
	if (ioctl(fd, AMDKFD_IOC_GET_PROCESS_APERTURES_NEW, &a))
		die("GET_PROCESS_APERTURES_NEW");
	for (uint32_t i = 0; i < a.num_of_nodes && i < MAXGPU; i++)
		ids[i] = ap[i].gpu_id;
	return a.num_of_nodes < MAXGPU ? (int)a.num_of_nodes : MAXGPU;
}

/* ACQUIRE_VM on GPU i with render node renderD<128+i> beside the kfd file. */
static void acquire_vms(struct kctx *k, int n)
{
	for (int i = 0; i < n; i++) {
		char p[4200];
		snprintf(p, sizeof(p), "%s/renderD%d", dir, 128 + i);
		k->render[i] = open(p, O_RDWR | O_CLOEXEC);
		if (k->render[i] < 0)
			die(p);
		struct kfd_ioctl_acquire_vm_args a = { .drm_fd = (uint32_t)k->render[i],
						       .gpu_id = k->gpus[i] };
		if (ioctl(k->fd, AMDKFD_IOC_ACQUIRE_VM, &a))
			die("ACQUIRE_VM");
	}
}

static int alloc_vram(int fd, uint32_t gpu, uint64_t va, uint64_t size, uint64_t *handle)
{
	struct kfd_ioctl_alloc_memory_of_gpu_args a = { 0 };
	a.va_addr = va;
	a.size = size;
	a.gpu_id = gpu;
	a.flags = KFD_IOC_ALLOC_MEM_FLAGS_VRAM | KFD_IOC_ALLOC_MEM_FLAGS_WRITABLE;
	int r = ioctl(fd, AMDKFD_IOC_ALLOC_MEMORY_OF_GPU, &a);
	*handle = a.handle;
	return r;
}

static int map_unmap(int fd, unsigned long cmd, uint64_t handle, uint32_t *ids, int n)
{
	struct kfd_ioctl_map_memory_to_gpu_args m = { 0 };
	m.handle = handle;
	m.device_ids_array_ptr = (uintptr_t)ids;
	m.n_devices = (uint32_t)n;
	m.n_success = 0;
	int r = ioctl(fd, cmd, &m);
	if (r == 0 && m.n_success != (uint32_t)n) {
		errno = EPROTO;
		return -1;
	}
	return r;
}

static int free_mem(int fd, uint64_t handle)
{
	struct kfd_ioctl_free_memory_of_gpu_args f = { .handle = handle };
	return ioctl(fd, AMDKFD_IOC_FREE_MEMORY_OF_GPU, &f);
}

static uint32_t signal_event(int fd, int auto_reset)
{
	struct kfd_ioctl_create_event_args e = { 0 };
	e.event_type = KFD_IOC_EVENT_SIGNAL;
	e.auto_reset = (uint32_t)auto_reset;
	if (ioctl(fd, AMDKFD_IOC_CREATE_EVENT, &e))
		die("CREATE_EVENT");
	return e.event_id;
}

static int wait_events(int fd, struct kfd_event_data *ev, int n, uint32_t timeout)
{
	struct kfd_ioctl_wait_events_args w = { 0 };
	w.events_ptr = (uintptr_t)ev;
	w.num_events = (uint32_t)n;
	w.wait_for_all = 1;
	w.timeout = timeout;
	int r = ioctl(fd, AMDKFD_IOC_WAIT_EVENTS, &w);
	if (r == 0 && w.wait_result != KFD_IOC_WAIT_RESULT_COMPLETE) {
		errno = ETIME;
		return -1;
	}
	return r;
}

static void setup(struct kctx *k)
{
	memset(k, 0, sizeof(*k));
	k->fd = -1;
	if (mode == M_PIPEPP) {
		int p[2], q[2];
		if (pipe(p) || pipe(q))
			die("pipe");
		pid_t pid = fork();
		if (pid < 0)
			die("fork");
		if (pid == 0) { /* echo process */
			char c;
			close(p[1]);
			close(q[0]);
			if (echo_cpu >= 0)
				pin(echo_cpu);
			while (read(p[0], &c, 1) == 1)
				if (write(q[1], &c, 1) != 1)
					break;
			_exit(0);
		}
		close(p[0]);
		close(q[1]);
		k->ppw = p[1];
		k->ppr = q[0];
		return;
	}
	if (mode == M_PVMR || mode == M_PVMW) {
		/* The target: a copy of this process (same addresses) that waits to be killed. */
		k->peer = fork();
		if (k->peer < 0)
			die("fork");
		if (k->peer == 0) {
			for (;;)
				pause();
		}
		return;
	}
	k->fd = open_kfd();
	if (mode == M_FIOC || mode == M_VERSION)
		return;
	k->ngpus = gpu_ids(k->fd, k->gpus);
	if (mode == M_MAP8) {
		if (k->ngpus < ngpus_map) {
			fprintf(stderr, "kfdbench: map8 needs %d GPUs, the device has %d\n", ngpus_map,
				k->ngpus);
			exit(2);
		}
		acquire_vms(k, ngpus_map);
		if (alloc_vram(k->fd, k->gpus[0], 1ull << 32, 2 << 20, &k->handle))
			die("ALLOC_MEMORY_OF_GPU");
	} else if (mode == M_CYCLE) {
		acquire_vms(k, 1);
	} else if (mode == M_WAIT64) {
		for (int i = 0; i < NEVENTS; i++) {
			uint32_t id = signal_event(k->fd, 0); /* manual reset: stays signalled */
			struct kfd_ioctl_set_event_args s = { .event_id = id };
			if (ioctl(k->fd, AMDKFD_IOC_SET_EVENT, &s))
				die("SET_EVENT");
			memset(&k->ev[i], 0, sizeof(k->ev[i]));
			k->ev[i].event_id = id;
		}
	}
}

static void teardown(struct kctx *k)
{
	if (mode == M_PIPEPP) {
		close(k->ppw);
		close(k->ppr);
		wait(NULL);
		return;
	}
	if (mode == M_PVMR || mode == M_PVMW) {
		kill(k->peer, SIGKILL);
		waitpid(k->peer, NULL, 0);
		return;
	}
	if (mode == M_MAP8 && (k->iter & 1))
		map_unmap(k->fd, AMDKFD_IOC_UNMAP_MEMORY_FROM_GPU, k->handle, k->gpus, ngpus_map);
	close(k->fd);
	for (int i = 0; i < k->ngpus && i < MAXGPU; i++)
		if (k->render[i] > 0)
			close(k->render[i]);
}

static int op(struct kctx *k)
{
	switch (mode) {
	case M_PIPEPP: {
		char c = 0;
		if (write(k->ppw, &c, 1) != 1)
			return -1;
		return read(k->ppr, &c, 1) == 1 ? 0 : -1;
	}
	case M_PVMR:
	case M_PVMW: {
		struct iovec l = { pvm_local, pvm_bytes }, r = { pvm_remote, pvm_bytes };
		ssize_t n = mode == M_PVMR ? process_vm_readv(k->peer, &l, 1, &r, 1, 0)
					   : process_vm_writev(k->peer, &l, 1, &r, 1, 0);
		return n == (ssize_t)pvm_bytes ? 0 : -1;
	}
	case M_FIOC: {
		size_t v;
		return ioctl(k->fd, FIOC_GET, &v);
	}
	case M_VERSION: {
		struct kfd_ioctl_get_version_args v;
		return ioctl(k->fd, AMDKFD_IOC_GET_VERSION, &v);
	}
	case M_CLOCK: {
		struct kfd_ioctl_get_clock_counters_args c = { 0 };
		c.gpu_id = k->gpus[0];
		return ioctl(k->fd, AMDKFD_IOC_GET_CLOCK_COUNTERS, &c);
	}
	case M_MAP8: {
		unsigned long cmd = (k->iter++ & 1) ? AMDKFD_IOC_UNMAP_MEMORY_FROM_GPU
						     : AMDKFD_IOC_MAP_MEMORY_TO_GPU;
		return map_unmap(k->fd, cmd, k->handle, k->gpus, ngpus_map);
	}
	case M_WAIT64:
		return wait_events(k->fd, k->ev, NEVENTS, 1000);
	case M_CYCLE: {
		uint64_t h;
		if (alloc_vram(k->fd, k->gpus[0], 1ull << 33, 64 << 10, &h))
			return -1;
		int r = map_unmap(k->fd, AMDKFD_IOC_MAP_MEMORY_TO_GPU, h, k->gpus, 1);
		if (!r)
			r = map_unmap(k->fd, AMDKFD_IOC_UNMAP_MEMORY_FROM_GPU, h, k->gpus, 1);
		if (free_mem(k->fd, h))
			r = -1;
		return r;
	}
	default:
		return -1;
	}
}

static void record_err(long id, const char *what)
{
	if (!sh->cl[id].errs++) {
		sh->cl[id].err_no = errno;
		snprintf(sh->cl[id].what, sizeof(sh->cl[id].what), "%s", what);
	}
}

static void *run_client(void *argp)
{
	long id = (long)argp;
	uint32_t *l = lat + id * N;
	struct kctx *k = malloc(sizeof(*k));

	if (!k)
		die("malloc");
	if (ncpus)
		pin(cpus[id % ncpus]);
	setup(k);
	for (int i = 0; i < 2000; i++)
		if (op(k) < 0)
			record_err(id, "warm-up");
	for (int pass = 0; pass < 2; pass++) {
		pthread_barrier_wait(&sh->bar);
		sh->cl[id].t0[pass] = now_ns();
		if (pass == 0) {
			for (long i = 0; i < N; i++)
				if (op(k) < 0)
					record_err(id, "untimed pass");
		} else {
			for (long i = 0; i < N; i++) {
				uint64_t a = now_ns();
				if (op(k) < 0)
					record_err(id, "timed pass");
				uint64_t d = now_ns() - a;
				l[i] = d > UINT32_MAX ? UINT32_MAX : (uint32_t)d;
			}
		}
		sh->cl[id].t1[pass] = now_ns();
	}
	teardown(k);
	free(k);
	return NULL;
}

static int cmp32(const void *a, const void *b)
{
	uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
	return x < y ? -1 : x > y;
}

static void *shmap(size_t n)
{
	void *p = mmap(NULL, n, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	if (p == MAP_FAILED)
		die("mmap");
	return p;
}

/* Contexts released so far according to the daemon's stats file ("contexts N"). */
static long stats_contexts(void)
{
	char p[4200], line[256];
	long v = -1;
	snprintf(p, sizeof(p), "%s/stats", dir);
	FILE *f = fopen(p, "r");
	if (!f)
		return -1;
	while (fgets(line, sizeof(line), f))
		if (sscanf(line, "contexts %ld", &v) == 1)
			break;
	fclose(f);
	return v;
}

static void raise_nofile(long want)
{
	struct rlimit r = { (rlim_t)want, (rlim_t)want };
	if (setrlimit(RLIMIT_NOFILE, &r))
		die("setrlimit(RLIMIT_NOFILE)");
}

static int run_scale(void)
{
	int n = count > 0 ? count : 10000;
	int *fds = malloc(sizeof(int) * (size_t)n);
	char line[64];

	if (!fds)
		die("malloc");
	raise_nofile(n + 64);
	long base = stats_contexts();
	uint64_t t0 = now_ns();
	for (int i = 0; i < n; i++)
		fds[i] = open_kfd();
	uint64_t t1 = now_ns();
	long during = stats_contexts();
	printf("opened=%d open_s=%.3f open_per_s=%.0f contexts_before=%ld contexts_during=%ld\n", n,
	       (t1 - t0) / 1e9, n * 1e9 / (double)(t1 - t0), base, during);
	fflush(stdout);
	if (!fgets(line, sizeof(line), stdin))
		line[0] = 0;
	uint64_t t2 = now_ns();
	for (int i = 0; i < n; i++)
		close(fds[i]);
	uint64_t t3 = now_ns();
	/* RELEASE is asynchronous: wait until the daemon has freed them all. */
	long left = -1;
	for (int i = 0; i < 60000; i++) {
		left = stats_contexts();
		if (left <= base)
			break;
		usleep(1000);
	}
	uint64_t t4 = now_ns();
	printf("closed=%d close_s=%.3f released_s=%.3f close_per_s=%.0f contexts_after=%ld\n", n,
	       (t3 - t2) / 1e9, (t4 - t2) / 1e9, n * 1e9 / (double)(t4 - t2), left);
	return left <= base ? 0 : 1;
}

static int run_hold(void)
{
	int n = count >= 0 ? count : 100;
	raise_nofile(n + 64);
	for (int i = 0; i < n; i++)
		if (open_kfd() < 0)
			return 2;
	int fd = open_kfd();
	struct kfd_event_data ev;
	memset(&ev, 0, sizeof(ev));
	ev.event_id = signal_event(fd, 1);
	printf("ready idle=%d\n", n);
	fflush(stdout);
	/* Blocks in the daemon until this process is killed. */
	int r = wait_events(fd, &ev, 1, 0xffffffffu); /* infinite */
	fprintf(stderr, "kfdbench hold: WAIT_EVENTS returned %d (%s)\n", r, strerror(errno));
	return 1;
}

int main(int argc, char **argv)
{
	int o;

	while ((o = getopt(argc, argv, "n:t:Ta:b:c:g:s:")) != -1) {
		switch (o) {
		case 'n': N = atol(optarg); break;
		case 't': nclients = atoi(optarg); break;
		case 'T': use_threads = 1; break;
		case 'b': echo_cpu = atoi(optarg); break;
		case 'c': count = atoi(optarg); break;
		case 'g': ngpus_map = atoi(optarg); break;
		case 's': pvm_bytes = strtoul(optarg, NULL, 0); break;
		case 'a':
			for (char *t = strtok(optarg, ","); t && ncpus < 64; t = strtok(NULL, ","))
				cpus[ncpus++] = atoi(t);
			break;
		default: fprintf(stderr, "usage: see the comment at the top of kfdbench.c\n"); return 2;
		}
	}
	if (optind >= argc || N <= 0 || nclients <= 0 || ngpus_map <= 0 || ngpus_map > MAXGPU ||
	    pvm_bytes == 0 || pvm_bytes > sizeof(pvm_local)) {
		fprintf(stderr, "usage: kfdbench MODE [-n N] [-t C] [-T] [-a CPUS] [-b CPU] [-c COUNT] [-s BYTES] [PATH]\n");
		return 2;
	}
	int m = -1;
	for (int i = 0; i < (int)(sizeof(mode_names) / sizeof(*mode_names)); i++)
		if (!strcmp(argv[optind], mode_names[i]))
			m = i;
	if (m < 0) {
		fprintf(stderr, "kfdbench: unknown mode %s\n", argv[optind]);
		return 2;
	}
	mode = (enum mode)m;
	if (mode != M_PIPEPP && mode != M_PVMR && mode != M_PVMW) {
		if (optind + 1 >= argc) {
			fprintf(stderr, "kfdbench: %s needs a PATH\n", mode_names[m]);
			return 2;
		}
		path = argv[optind + 1];
		char tmp[4096];
		snprintf(tmp, sizeof(tmp), "%s", path);
		snprintf(dir, sizeof(dir), "%s", dirname(tmp));
	}
	if (mode == M_SCALE)
		return run_scale();
	if (mode == M_HOLD)
		return run_hold();

	sh = shmap(sizeof(*sh) + sizeof(sh->cl[0]) * (size_t)nclients);
	lat = shmap(sizeof(uint32_t) * (size_t)nclients * (size_t)N);
	pthread_barrierattr_t ba;
	pthread_barrierattr_init(&ba);
	pthread_barrierattr_setpshared(&ba, PTHREAD_PROCESS_SHARED);
	pthread_barrier_init(&sh->bar, &ba, (unsigned)nclients);

	if (use_threads) {
		pthread_t th[nclients];
		for (long i = 0; i < nclients; i++)
			pthread_create(&th[i], NULL, run_client, (void *)i);
		for (int i = 0; i < nclients; i++)
			pthread_join(th[i], NULL);
	} else {
		for (long i = 0; i < nclients; i++) {
			pid_t p = fork();
			if (p < 0)
				die("fork");
			if (p == 0) {
				run_client((void *)i);
				_exit(0);
			}
		}
		int st, bad = 0;
		while (wait(&st) > 0)
			if (!WIFEXITED(st) || WEXITSTATUS(st))
				bad = 1;
		if (bad) {
			fprintf(stderr, "kfdbench: a client failed\n");
			return 2;
		}
	}

	double ops[2];
	long errs = 0;
	for (int pass = 0; pass < 2; pass++) {
		uint64_t t0 = UINT64_MAX, t1 = 0;
		for (int i = 0; i < nclients; i++) {
			if (sh->cl[i].t0[pass] < t0)
				t0 = sh->cl[i].t0[pass];
			if (sh->cl[i].t1[pass] > t1)
				t1 = sh->cl[i].t1[pass];
		}
		ops[pass] = (double)nclients * (double)N * 1e9 / (double)(t1 - t0);
	}
	for (int i = 0; i < nclients; i++) {
		errs += sh->cl[i].errs;
		if (sh->cl[i].errs)
			fprintf(stderr, "kfdbench: client %d: %ld errors, first in the %s: %s\n", i,
				sh->cl[i].errs, sh->cl[i].what, strerror(sh->cl[i].err_no));
	}
	size_t tot = (size_t)nclients * (size_t)N;
	double sum = 0;
	for (size_t i = 0; i < tot; i++)
		sum += lat[i];
	qsort(lat, tot, sizeof(uint32_t), cmp32);
	printf("mode=%s clients=%d %s n=%ld ops_s=%.0f timed_ops_s=%.0f p50_ns=%u p90_ns=%u "
	       "p99_ns=%u p999_ns=%u max_ns=%u mean_ns=%.0f errors=%ld\n",
	       mode_names[m], nclients, use_threads ? "threads" : "procs", N, ops[0], ops[1],
	       lat[tot / 2], lat[tot * 90 / 100], lat[tot * 99 / 100], lat[tot * 999 / 1000],
	       lat[tot - 1], sum / (double)tot, errs);
	return errs ? 1 : 0;
}
