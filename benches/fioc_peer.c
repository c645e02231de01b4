/*
 * fioc_peer: the libfuse3 peer of scripts/bench — the smallest useful ioctl server on Debian's
 * libfuse 3 (high-level API), written for this project. The mount holds one regular file,
 * `fioc`, answering two restricted ioctls on an 8-byte value:
 *   _IOR('E', 0, size_t)  read the value      _IOW('E', 1, size_t)  set the value
 * Anything else is ENOTTY. Run it as libfuse servers run:
 *   fioc_peer -f -s MOUNTPOINT    one thread (the -s peer)
 *   fioc_peer -f MOUNTPOINT       libfuse's multi-threaded loop (the -mt peer)
 * It ends on SIGTERM/SIGINT or unmount.
 */
#define FUSE_USE_VERSION 35
#include <errno.h>
#include <fuse.h>
#include <stdatomic.h>
#include <stddef.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>

#define PEER_GET _IOR('E', 0, size_t)
#define PEER_SET _IOW('E', 1, size_t)
static const char file_name[] = "fioc";
static _Atomic size_t value;

static int peer_getattr(const char *p, struct stat *st, struct fuse_file_info *fi)
{
	(void)fi;
	memset(st, 0, sizeof(*st));
	if (!strcmp(p, "/")) {
		st->st_mode = S_IFDIR | 0755;
		st->st_nlink = 2;
		return 0;
	}
	if (p[0] == '/' && !strcmp(p + 1, file_name)) {
		st->st_mode = S_IFREG | 0666;
		st->st_nlink = 1;
		return 0;
	}
	return -ENOENT;
}

static int peer_open(const char *p, struct fuse_file_info *fi)
{
	if (p[0] != '/' || strcmp(p + 1, file_name))
		return -ENOENT;
	fi->direct_io = 1; /* no page cache: the file is only a handle for ioctls */
	return 0;
}

static int peer_readdir(const char *p, void *buf, fuse_fill_dir_t fill, off_t off,
			struct fuse_file_info *fi, enum fuse_readdir_flags fl)
{
	(void)off;
	(void)fi;
	(void)fl;
	if (strcmp(p, "/"))
		return -ENOENT;
	fill(buf, ".", NULL, 0, 0);
	fill(buf, "..", NULL, 0, 0);
	fill(buf, file_name, NULL, 0, 0);
	return 0;
}

static int peer_ioctl(const char *p, unsigned int cmd, void *arg, struct fuse_file_info *fi,
		      unsigned int flags, void *data)
{
	(void)p;
	(void)arg;
	(void)fi;
	if (flags & FUSE_IOCTL_COMPAT)
		return -ENOSYS;
	switch (cmd) {
	case PEER_GET:
		*(size_t *)data = atomic_load(&value);
		return 0;
	case PEER_SET:
		atomic_store(&value, *(size_t *)data);
		return 0;
	}
	return -ENOTTY;
}

static const struct fuse_operations ops = {
	.getattr = peer_getattr,
	.open = peer_open,
	.readdir = peer_readdir,
	.ioctl = peer_ioctl,
};

int main(int argc, char **argv)
{
	return fuse_main(argc, argv, &ops, NULL);
}
