/* topology.c - NUMA nodes, cores, distances and device locality from hwloc (see topology.h). */
#include "topology.h"

#include <errno.h>
#include <hwloc.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>

struct q3_topo {
	hwloc_topology_t h;
	int nnodes;
	struct q3_topo_node *nodes; /* ascending os */
	int *dist;		    /* [nnodes][nnodes] by node index, NULL: derived */
	char sysfs[PATH_MAX];	    /* "" : no sysfs fallback */
};

static int node_index(const struct q3_topo *t, int os)
{
	for (int i = 0; i < t->nnodes; i++)
		if (t->nodes[i].os == os)
			return i;
	return -1;
}

static int cmp_node(const void *a, const void *b)
{
	return ((const struct q3_topo_node *)a)->os - ((const struct q3_topo_node *)b)->os;
}

static int cmp_int(const void *a, const void *b)
{
	return *(const int *)a - *(const int *)b;
}

/* Cores whose PUs all lie in set (or PUs, if the topology has no cores). */
static int cores_in(hwloc_topology_t h, hwloc_const_cpuset_t set, int *out, int max)
{
	hwloc_obj_type_t type = hwloc_get_nbobjs_by_type(h, HWLOC_OBJ_CORE) > 0 ? HWLOC_OBJ_CORE
										: HWLOC_OBJ_PU;
	hwloc_obj_t o = NULL;
	int n = 0;

	while ((o = hwloc_get_next_obj_by_type(h, type, o)) && n < max)
		if (!hwloc_bitmap_iszero(o->cpuset) && hwloc_bitmap_isincluded(o->cpuset, set))
			out[n++] = hwloc_bitmap_first(o->cpuset);
	qsort(out, (size_t)n, sizeof(int), cmp_int);
	return n;
}

static int build(struct q3_topo *t, q3_err *e)
{
	hwloc_topology_t h = t->h;
	int n = hwloc_get_nbobjs_by_type(h, HWLOC_OBJ_NUMANODE), ncore_all;
	struct hwloc_distances_s *d = NULL;
	unsigned nr = 1;

	if (n <= 0)
		return q3_errf(e, -EINVAL, "topology: no NUMA node");
	ncore_all = hwloc_get_nbobjs_by_type(h, HWLOC_OBJ_PU);
	t->nodes = calloc((size_t)n, sizeof(*t->nodes));
	if (!t->nodes)
		return q3_errf(e, -ENOMEM, "out of memory");
	t->nnodes = n;
	for (int i = 0; i < n; i++) {
		hwloc_obj_t o = hwloc_get_obj_by_type(h, HWLOC_OBJ_NUMANODE, (unsigned)i);
		struct q3_topo_node *nd = &t->nodes[i];
		int *cores = calloc((size_t)ncore_all + 1, sizeof(int));

		if (!cores)
			return q3_errf(e, -ENOMEM, "out of memory");
		nd->os = (int)o->os_index;
		nd->mem = o->attr ? o->attr->numanode.local_memory : 0;
		nd->ncores = cores_in(h, o->cpuset, cores, ncore_all);
		nd->cores = cores;
		nd->npus = hwloc_bitmap_weight(o->cpuset);
	}
	qsort(t->nodes, (size_t)n, sizeof(*t->nodes), cmp_node);
	if (hwloc_distances_get_by_type(h, HWLOC_OBJ_NUMANODE, &nr, &d,
					HWLOC_DISTANCES_KIND_MEANS_LATENCY, 0) == 0 && nr >= 1 && d) {
		/* nr says how many matrices exist; d holds the first (released below either way) */
		t->dist = calloc((size_t)n * (size_t)n, sizeof(int));
		if (t->dist)
			for (unsigned i = 0; i < d->nbobjs; i++)
				for (unsigned j = 0; j < d->nbobjs; j++) {
					int a = node_index(t, (int)d->objs[i]->os_index);
					int b = node_index(t, (int)d->objs[j]->os_index);

					if (a >= 0 && b >= 0)
						t->dist[a * n + b] = (int)d->values[i * d->nbobjs + j];
				}
		hwloc_distances_release(h, d);
	}
	return 0;
}

static int load(const char *xml, const char *synth, struct q3_topo **out, q3_err *e)
{
	struct q3_topo *t = calloc(1, sizeof(*t));
	int err;

	*out = NULL;
	if (!t)
		return q3_errf(e, -ENOMEM, "out of memory");
	if (hwloc_topology_init(&t->h)) {
		free(t);
		return q3_errf(e, -ENOMEM, "topology: hwloc_topology_init failed");
	}
	if (xml && hwloc_topology_set_xml(t->h, xml)) {
		err = q3_errf(e, -EINVAL, "topology: %s: not an hwloc XML file", xml);
		goto fail;
	}
	if (synth && hwloc_topology_set_synthetic(t->h, synth)) {
		err = q3_errf(e, -EINVAL, "topology: bad synthetic description '%s'", synth);
		goto fail;
	}
	hwloc_topology_set_io_types_filter(t->h, xml || synth ? HWLOC_TYPE_FILTER_KEEP_ALL
							      : HWLOC_TYPE_FILTER_KEEP_IMPORTANT);
	/* The linux component reads PCI devices from sysfs itself; the libpciaccess-based "pci"
	 * component adds nothing we use, is slower, and leaks in libpciaccess. */
	hwloc_topology_set_components(t->h, HWLOC_TOPOLOGY_COMPONENTS_FLAG_BLACKLIST, "pci");
	if (hwloc_topology_load(t->h)) {
		err = q3_errf(e, -EINVAL, "topology: %s: hwloc cannot load it",
			      xml ? xml : synth ? synth : "this machine");
		goto fail;
	}
	if (!xml && !synth)
		snprintf(t->sysfs, sizeof(t->sysfs), "/sys");
	err = build(t, e);
	if (err)
		goto fail;
	*out = t;
	return 0;
fail:
	q3_topo_free(t);
	return err;
}

int q3_topo_load(const char *xml, struct q3_topo **out, q3_err *e)
{
	return load(xml, NULL, out, e);
}

int q3_topo_load_synthetic(const char *desc, struct q3_topo **out, q3_err *e)
{
	return load(NULL, desc, out, e);
}

void q3_topo_free(struct q3_topo *t)
{
	if (!t)
		return;
	for (int i = 0; i < t->nnodes; i++)
		free((void *)t->nodes[i].cores);
	free(t->nodes);
	free(t->dist);
	hwloc_topology_destroy(t->h);
	free(t);
}

void q3_topo_set_sysfs(struct q3_topo *t, const char *root)
{
	snprintf(t->sysfs, sizeof(t->sysfs), "%s", root ? root : "");
}

int q3_topo_nnodes(const struct q3_topo *t)
{
	return t->nnodes;
}

const struct q3_topo_node *q3_topo_node_at(const struct q3_topo *t, int i)
{
	return i >= 0 && i < t->nnodes ? &t->nodes[i] : NULL;
}

const struct q3_topo_node *q3_topo_node_os(const struct q3_topo *t, int os)
{
	int i = node_index(t, os);

	return i < 0 ? NULL : &t->nodes[i];
}

int q3_topo_distance(const struct q3_topo *t, int a, int b)
{
	int ia = node_index(t, a), ib = node_index(t, b);
	hwloc_obj_t oa, ob, anc;

	if (ia < 0 || ib < 0)
		return INT_MAX;
	if (t->dist && t->dist[ia * t->nnodes + ib] > 0)
		return t->dist[ia * t->nnodes + ib];
	if (ia == ib)
		return 10;
	oa = hwloc_get_numanode_obj_by_os_index(t->h, (unsigned)a);
	ob = hwloc_get_numanode_obj_by_os_index(t->h, (unsigned)b);
	anc = oa && ob ? hwloc_get_common_ancestor_obj(t->h, oa, ob) : NULL;
	return anc && anc->type != HWLOC_OBJ_MACHINE ? 20 : 30;
}

int q3_topo_node_order(const struct q3_topo *t, int from, int *order, int max)
{
	int n = Q3_MIN(t->nnodes, max);

	for (int i = 0; i < t->nnodes && i < max; i++)
		order[i] = t->nodes[i].os;
	if (from < 0 || node_index(t, from) < 0)
		return n;
	/* insertion sort by (distance from `from`, os); from itself has the smallest distance */
	for (int i = 1; i < n; i++)
		for (int j = i; j > 0; j--) {
			int da = q3_topo_distance(t, from, order[j - 1]), db = q3_topo_distance(t, from, order[j]);
			bool before = db < da || (db == da && order[j] == from) ||
				      (db == da && order[j - 1] != from && order[j] < order[j - 1]);

			if (!before)
				break;
			int tmp = order[j];

			order[j] = order[j - 1];
			order[j - 1] = tmp;
		}
	return n;
}

int q3_topo_node_cores(const struct q3_topo *t, int os, int *cpus, int max)
{
	const struct q3_topo_node *nd;
	int n = 0;

	if (os < 0) {
		hwloc_obj_t root = hwloc_get_root_obj(t->h);

		return cores_in(t->h, root->cpuset, cpus, max);
	}
	nd = q3_topo_node_os(t, os);
	if (!nd)
		return 0;
	for (; n < nd->ncores && n < max; n++)
		cpus[n] = nd->cores[n];
	return n;
}

/* ---- devices ---------------------------------------------------------------------------------- */

static int parse_busid(const char *s, unsigned *dom, unsigned *bus, unsigned *dev, unsigned *fn)
{
	char tail;

	if (sscanf(s, "%x:%x:%x.%x%c", dom, bus, dev, fn, &tail) == 4)
		return *dom <= 0xffff && *bus <= 0xff && *dev <= 0x1f && *fn <= 7 ? 0 : -EINVAL;
	*dom = 0;
	if (sscanf(s, "%x:%x.%x%c", bus, dev, fn, &tail) == 3)
		return *bus <= 0xff && *dev <= 0x1f && *fn <= 7 ? 0 : -EINVAL;
	return -EINVAL;
}

static bool is_busid(const char *s)
{
	unsigned a, b, c, d;

	return strlen(s) == 12 && parse_busid(s, &a, &b, &c, &d) == 0;
}

static int read_int_file(const char *path, int *v)
{
	FILE *f = fopen(path, "r");
	int ok;

	if (!f)
		return -errno;
	ok = fscanf(f, "%d", v) == 1;
	fclose(f);
	return ok ? 0 : -EINVAL;
}

/* A device's locality from the nodeset of its first non-I/O ancestor. */
static void locality_of(const struct q3_topo *t, hwloc_obj_t o, struct q3_locality *loc)
{
	hwloc_obj_t anc = hwloc_get_non_io_ancestor_obj(t->h, o);
	int w = anc ? hwloc_bitmap_weight(anc->nodeset) : -1;

	snprintf(loc->via, sizeof(loc->via), "hwloc");
	loc->nnodes = w > 0 ? w : t->nnodes;
	if (w <= 0 || (w > 1 && w == t->nnodes))
		loc->node = t->nnodes == 1 ? t->nodes[0].os : -1;
	else
		loc->node = hwloc_bitmap_first(anc->nodeset);
}

int q3_topo_pci_locality(const struct q3_topo *t, const char *busid, struct q3_locality *loc,
			 q3_err *e)
{
	unsigned dom, bus, dev, fn;
	hwloc_obj_t o;
	char path[PATH_MAX + 64];
	int node, err;

	memset(loc, 0, sizeof(*loc));
	loc->node = -1;
	snprintf(loc->via, sizeof(loc->via), "none");
	if (parse_busid(busid, &dom, &bus, &dev, &fn))
		return q3_errf(e, -EINVAL, "topology: '%s' is not a PCI bus id (dddd:bb:dd.f)", busid);
	snprintf(loc->busid, sizeof(loc->busid), "%04x:%02x:%02x.%x", dom, bus, dev, fn);
	o = hwloc_get_pcidev_by_busid(t->h, dom, bus, dev, fn);
	if (o) {
		locality_of(t, o, loc);
		return 0;
	}
	if (!t->sysfs[0])
		return q3_errf(e, -ENOENT, "topology: no PCI device %s", loc->busid);
	snprintf(path, sizeof(path), "%s/bus/pci/devices/%s/numa_node", t->sysfs, loc->busid);
	err = read_int_file(path, &node);
	if (err)
		return q3_errf(e, -ENOENT, "topology: no PCI device %s (%s)", loc->busid, path);
	snprintf(loc->via, sizeof(loc->via), "sysfs");
	loc->node = node >= 0 && node_index(t, node) >= 0 ? node : (t->nnodes == 1 ? t->nodes[0].os : -1);
	loc->nnodes = loc->node >= 0 ? 1 : t->nnodes;
	return 0;
}

int q3_topo_blockdev_locality(const struct q3_topo *t, unsigned major, unsigned minor,
			      struct q3_locality *loc, q3_err *e)
{
	char link[PATH_MAX], real[PATH_MAX];

	memset(loc, 0, sizeof(*loc));
	loc->node = -1;
	snprintf(loc->via, sizeof(loc->via), "none");
	if (!t->sysfs[0])
		return 0;
	snprintf(link, sizeof(link), "%s/dev/block/%u:%u", t->sysfs, major, minor);
	if (!realpath(link, real))
		return 0; /* no such block device in sysfs: not a disk (tmpfs, overlay) */
	/* the nearest PCI device above the disk (or partition) */
	for (char *slash; (slash = strrchr(real, '/')) && slash != real; *slash = 0)
		if (is_busid(slash + 1))
			return q3_topo_pci_locality(t, slash + 1, loc, e);
	return 0;
}

int q3_topo_path_locality(const struct q3_topo *t, const char *path, struct q3_locality *loc,
			  q3_err *e)
{
	struct stat st;

	if (stat(path, &st))
		return q3_errf(e, -errno, "topology: %s: %s", path, strerror(errno));
	return q3_topo_blockdev_locality(t, major(st.st_dev), minor(st.st_dev), loc, e);
}

int q3_parse_cpulist(const char *s, int *cpus, int max)
{
	int n = 0;
	const char *p = s;

	if (!s || !*s)
		return -EINVAL;
	while (*p) {
		char *end;
		long a = strtol(p, &end, 10), b;

		if (end == p || a < 0 || a > 65535)
			return -EINVAL;
		b = a;
		p = end;
		if (*p == '-') {
			b = strtol(p + 1, &end, 10);
			if (end == p + 1 || b < a || b > 65535)
				return -EINVAL;
			p = end;
		}
		if (*p == ',' && p[1])
			p++;
		else if (*p)
			return -EINVAL;
		for (long c = a; c <= b; c++) {
			bool dup = false;

			for (int i = 0; i < n; i++)
				dup |= cpus[i] == (int)c;
			if (dup)
				continue;
			if (n == max)
				return -EINVAL;
			cpus[n++] = (int)c;
		}
	}
	qsort(cpus, (size_t)n, sizeof(int), cmp_int);
	return n;
}
