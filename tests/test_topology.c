/* test_topology.c - NUMA nodes, cores, distances and device locality (userspace/topology.h) on
 * hwloc synthetic descriptions (1, 2 and 4 nodes), on the XML machines of
 * tests/fixtures/topology (a GPU and an NVMe drive attached to chosen nodes, distance matrices),
 * on a fake sysfs tree (the fallback and the block-device walk), and on this machine. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "testutil.h"
#include "topology.h"

#define TOPO "tests/fixtures/topology"

static struct q3_topo *xml(const char *name)
{
	char path[256];
	struct q3_topo *t;
	q3_err e = {0};

	snprintf(path, sizeof(path), "%s/%s", TOPO, name);
	if (q3_topo_load(path, &t, &e))
		fail_msg("%s: %s", path, e.msg);
	return t;
}

static void check_order(const struct q3_topo *t, int from, const int *want, int n)
{
	int got[16];

	assert_int_equal(q3_topo_node_order(t, from, got, 16), n);
	for (int i = 0; i < n; i++)
		if (got[i] != want[i])
			fail_msg("order from %d: position %d is node %d, want %d", from, i, got[i], want[i]);
}

static void test_synthetic(void **state)
{
	struct q3_topo *t;
	q3_err e = {0};
	int cpus[64];

	assert_int_equal(q3_topo_load_synthetic("numa:1 core:8 pu:2", &t, &e), 0);
	assert_int_equal(q3_topo_nnodes(t), 1);
	assert_int_equal(q3_topo_node_at(t, 0)->ncores, 8);
	assert_int_equal(q3_topo_node_at(t, 0)->npus, 16);
	assert_int_equal(q3_topo_node_cores(t, -1, cpus, 64), 8);
	assert_int_equal(cpus[1], 2); /* first PU of the second core */
	q3_topo_free(t);

	assert_int_equal(q3_topo_load_synthetic("pack:2 numa:1 core:4 pu:1", &t, &e), 0);
	assert_int_equal(q3_topo_nnodes(t), 2);
	check_order(t, 1, (int[]){1, 0}, 2);
	assert_int_equal(q3_topo_distance(t, 0, 1), 30); /* no matrix: across packages */
	q3_topo_free(t);

	/* two packages of two nodes: from node 2, its package sibling 3, then 0 and 1 */
	assert_int_equal(q3_topo_load_synthetic("pack:2 numa:2 core:4 pu:2", &t, &e), 0);
	assert_int_equal(q3_topo_nnodes(t), 4);
	check_order(t, 2, (int[]){2, 3, 0, 1}, 4);
	check_order(t, -1, (int[]){0, 1, 2, 3}, 4);
	assert_int_equal(q3_topo_distance(t, 2, 3), 20);
	assert_int_equal(q3_topo_node_cores(t, 3, cpus, 64), 4);
	assert_int_equal(cpus[0], 24);
	assert_int_equal(q3_topo_node_cores(t, 7, cpus, 64), 0);
	assert_null(q3_topo_node_os(t, 7));
	assert_int_equal(q3_topo_node_cores(t, 3, cpus, 2), 2);
	q3_topo_free(t);

	assert_int_equal(q3_topo_load_synthetic("pack:two core:x", &t, &e), -EINVAL);
	assert_non_null(strstr(e.msg, "synthetic"));
}

static void test_xml_devices(void **state)
{
	struct q3_topo *t;
	struct q3_locality loc;
	q3_err e = {0};
	int cpus[64];

	t = xml("1node.xml");
	assert_int_equal(q3_topo_nnodes(t), 1);
	assert_true(q3_topo_node_at(t, 0)->mem == 128ull << 30);
	assert_int_equal(q3_topo_pci_locality(t, "0000:c1:00.0", &loc, &e), 0);
	assert_int_equal(loc.node, 0);
	assert_string_equal(loc.via, "hwloc");
	assert_int_equal(q3_topo_pci_locality(t, "C1:00.0", &loc, &e), 0); /* short, upper case */
	assert_string_equal(loc.busid, "0000:c1:00.0");
	assert_int_equal(q3_topo_pci_locality(t, "0000:c2:00.0", &loc, &e), -ENOENT);
	assert_non_null(strstr(e.msg, "0000:c2:00.0"));
	assert_int_equal(q3_topo_pci_locality(t, "gpu0", &loc, &e), -EINVAL);
	assert_int_equal(q3_topo_pci_locality(t, "0000:c1:40.0", &loc, &e), -EINVAL);
	q3_topo_free(t);

	t = xml("2node.xml");
	assert_int_equal(q3_topo_pci_locality(t, "0000:c1:00.0", &loc, &e), 0);
	assert_int_equal(loc.node, 1);
	assert_int_equal(loc.nnodes, 1);
	assert_int_equal(q3_topo_pci_locality(t, "0000:41:00.0", &loc, &e), 0); /* the NVMe */
	assert_int_equal(loc.node, 0);
	check_order(t, 1, (int[]){1, 0}, 2);
	assert_int_equal(q3_topo_distance(t, 0, 1), 21);
	assert_true(q3_topo_node_os(t, 0)->mem == 96ull << 30);
	assert_int_equal(q3_topo_node_cores(t, 1, cpus, 64), 8);
	assert_int_equal(cpus[0], 16);
	assert_int_equal(cpus[7], 30);
	q3_topo_free(t);

	t = xml("4node.xml");
	assert_int_equal(q3_topo_nnodes(t), 4);
	assert_int_equal(q3_topo_pci_locality(t, "0000:c1:00.0", &loc, &e), 0);
	assert_int_equal(loc.node, 2);
	assert_int_equal(q3_topo_pci_locality(t, "0000:41:00.0", &loc, &e), 0);
	assert_int_equal(loc.node, 3);
	/* the firmware's distances, not os order: 2 (10), 3 (12), 0 (32), 1 (35) */
	check_order(t, 2, (int[]){2, 3, 0, 1}, 4);
	check_order(t, 1, (int[]){1, 0, 3, 2}, 4);
	assert_int_equal(q3_topo_node_cores(t, 2, cpus, 64), 4);
	assert_int_equal(cpus[0], 16);
	q3_topo_free(t);

	t = xml("2node-nolocal.xml");
	assert_int_equal(q3_topo_pci_locality(t, "0000:c1:00.0", &loc, &e), 0);
	assert_int_equal(loc.node, -1);
	assert_int_equal(loc.nnodes, 2);
	q3_topo_free(t);

	assert_int_equal(q3_topo_load(TOPO "/make_topologies.py", &t, &e), -EINVAL);
	assert_int_equal(q3_topo_load(TOPO "/absent.xml", &t, &e), -EINVAL);
}

static void mkdirs(const char *path)
{
	char buf[512];

	snprintf(buf, sizeof(buf), "%s", path);
	for (char *p = buf + 1; *p; p++)
		if (*p == '/') {
			*p = 0;
			mkdir(buf, 0755);
			*p = '/';
		}
	mkdir(buf, 0755);
}

static void write_str(const char *path, const char *s)
{
	assert_int_equal(tu_write_file(path, s, strlen(s)), 0);
}

/* A fake sysfs: an NVMe partition under PCI device 0000:02:00.0, a loop device without PCI. */
static void test_sysfs(void **state)
{
	char *dir = tu_mkdtemp(), root[256], p[512];
	struct q3_topo *t;
	struct q3_locality loc;
	q3_err e = {0};

	snprintf(root, sizeof(root), "%s/sys", dir);
	snprintf(p, sizeof(p), "%s/devices/pci0000:00/0000:00:1d.0/0000:02:00.0/nvme/nvme0/nvme0n1/nvme0n1p1", root);
	mkdirs(p);
	snprintf(p, sizeof(p), "%s/devices/virtual/block/loop0", root);
	mkdirs(p);
	snprintf(p, sizeof(p), "%s/bus/pci/devices", root);
	mkdirs(p);
	snprintf(p, sizeof(p), "%s/dev/block", root);
	mkdirs(p);
	snprintf(p, sizeof(p), "%s/bus/pci/devices/0000:02:00.0", root);
	assert_int_equal(symlink("../../../devices/pci0000:00/0000:00:1d.0/0000:02:00.0", p), 0);
	snprintf(p, sizeof(p), "%s/devices/pci0000:00/0000:00:1d.0/0000:02:00.0/numa_node", root);
	write_str(p, "1\n");
	snprintf(p, sizeof(p), "%s/dev/block/259:1", root);
	assert_int_equal(symlink("../../devices/pci0000:00/0000:00:1d.0/0000:02:00.0/nvme/nvme0/nvme0n1/nvme0n1p1", p), 0);
	snprintf(p, sizeof(p), "%s/dev/block/7:0", root);
	assert_int_equal(symlink("../../devices/virtual/block/loop0", p), 0);

	assert_int_equal(q3_topo_load_synthetic("pack:2 numa:1 core:2 pu:1", &t, &e), 0);
	/* a synthetic machine does not read this machine's sysfs unless told */
	assert_int_equal(q3_topo_pci_locality(t, "0000:02:00.0", &loc, &e), -ENOENT);
	assert_int_equal(q3_topo_blockdev_locality(t, 259, 1, &loc, &e), 0);
	assert_int_equal(loc.node, -1);
	q3_topo_set_sysfs(t, root);
	assert_int_equal(q3_topo_pci_locality(t, "0000:02:00.0", &loc, &e), 0);
	assert_int_equal(loc.node, 1);
	assert_string_equal(loc.via, "sysfs");
	assert_int_equal(q3_topo_blockdev_locality(t, 259, 1, &loc, &e), 0);
	assert_int_equal(loc.node, 1);
	assert_string_equal(loc.busid, "0000:02:00.0");
	/* no NUMA information */
	snprintf(p, sizeof(p), "%s/devices/pci0000:00/0000:00:1d.0/0000:02:00.0/numa_node", root);
	write_str(p, "-1\n");
	assert_int_equal(q3_topo_blockdev_locality(t, 259, 1, &loc, &e), 0);
	assert_int_equal(loc.node, -1);
	/* no PCI parent, no such device */
	assert_int_equal(q3_topo_blockdev_locality(t, 7, 0, &loc, &e), 0);
	assert_int_equal(loc.node, -1);
	assert_string_equal(loc.via, "none");
	assert_int_equal(q3_topo_blockdev_locality(t, 8, 99, &loc, &e), 0);
	assert_string_equal(loc.via, "none");
	q3_topo_free(t);
	snprintf(p, sizeof(p), "rm -rf '%s'", dir);
	assert_int_equal(system(p), 0);
	free(dir);
}

static void test_this_machine(void **state)
{
	struct q3_topo *t;
	struct q3_locality loc;
	q3_err e = {0};
	int cpus[4096], n;

	assert_int_equal(q3_topo_load(NULL, &t, &e), 0);
	assert_true(q3_topo_nnodes(t) >= 1);
	n = q3_topo_node_cores(t, -1, cpus, 4096);
	assert_true(n >= 1);
	printf("# this machine: %d NUMA node(s), %d cores; node 0: %.1f GiB\n", q3_topo_nnodes(t), n,
	       (double)q3_topo_node_at(t, 0)->mem / (1 << 30));
	assert_int_equal(q3_topo_path_locality(t, ".", &loc, &e), 0);
	printf("# the repository's disk: node %d via %s %s\n", loc.node, loc.via, loc.busid);
	assert_true(loc.node >= -1);
	assert_int_equal(q3_topo_path_locality(t, "/nonexistent/x", &loc, &e), -ENOENT);
	q3_topo_free(t);
}

static void test_cpulist(void **state)
{
	int c[16];

	assert_int_equal(q3_parse_cpulist("0-3,8,10-11", c, 16), 7);
	assert_int_equal(c[4], 8);
	assert_int_equal(c[6], 11);
	assert_int_equal(q3_parse_cpulist("3,1,1", c, 16), 2);
	assert_int_equal(c[0], 1);
	assert_int_equal(c[1], 3);
	assert_int_equal(q3_parse_cpulist("0-20", c, 16), -EINVAL); /* does not fit */
	static const char *const bad[] = {"", "1-", "a", "3-1", "1,,2", "1,", "-1", "99999"};
	for (size_t i = 0; i < Q3_ARRAY_SIZE(bad); i++)
		if (q3_parse_cpulist(bad[i], c, 16) != -EINVAL)
			fail_msg("'%s' accepted", bad[i]);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_synthetic), cmocka_unit_test(test_xml_devices),
		cmocka_unit_test(test_sysfs),	  cmocka_unit_test(test_this_machine),
		cmocka_unit_test(test_cpulist),
	};

	/* One topology alive for the whole run, so that hwloc loads its plugins once: unloading and
	 * reloading them (the last topology freed, a new one made) trips LeakSanitizer on the
	 * plugins' thread-local storage. */
	struct q3_topo *anchor = NULL;
	q3_err e;
	int rc;

	q3_topo_load_synthetic("numa:1 core:1", &anchor, &e);
	rc = cmocka_run_group_tests(tests, NULL, NULL);
	q3_topo_free(anchor);
	return rc;
}
