/* topology.h - the machine as placement needs it, from hwloc: NUMA nodes (memory, physical
 * cores), the distances between them, and which node a PCI device (the GPU, the NVMe drive
 * holding the model) is local to.
 *
 * Loaded from this machine, from an hwloc XML file (tests, or a machine described elsewhere)
 * or from an hwloc synthetic description ("pack:2 numa:1 core:8 pu:2").  A device is looked up
 * among hwloc's PCI objects (its non-I/O ancestor's nodeset); where hwloc has no such object
 * (I/O discovery off, a device hidden from it) sysfs answers: bus/pci/devices/<id>/numa_node,
 * the files the kernel itself exposes (only for this machine: a topology read from XML or a
 * synthetic description answers from itself, unless q3_topo_set_sysfs says otherwise).
 */
#pragma once
#include <stdbool.h>
#include <stdint.h>

#include "util.h"

struct q3_topo;

struct q3_topo_node {
	int os;		  /* NUMA node number */
	uint64_t mem;	  /* local memory, bytes */
	int ncores;	  /* physical cores local to it */
	const int *cores; /* [ncores] the first PU (OS CPU number) of each core, ascending */
	int npus;	  /* hardware threads local to it */
};

/* Where a device sits. */
struct q3_locality {
	int node;	 /* NUMA node os index: the lowest of the device's locality; -1 when that is
			  * the whole machine (of several nodes) or the platform has no NUMA info */
	int nnodes;	 /* nodes in the device's locality (> 1: attached above several) */
	char via[16];	 /* "hwloc", "sysfs" or "none" */
	char busid[16];	 /* the PCI device found ("0000:01:00.0"), "" if none */
};

/* This machine (xml NULL) or an hwloc XML file. */
int q3_topo_load(const char *xml, struct q3_topo **out, q3_err *e);
/* An hwloc synthetic description (no I/O devices). */
int q3_topo_load_synthetic(const char *desc, struct q3_topo **out, q3_err *e);
void q3_topo_free(struct q3_topo *t);

/* Where sysfs is for the fallbacks (default "/sys"); tests point it at a fake tree. */
void q3_topo_set_sysfs(struct q3_topo *t, const char *root);

int q3_topo_nnodes(const struct q3_topo *t);
/* Nodes in ascending os order, i < q3_topo_nnodes. */
const struct q3_topo_node *q3_topo_node_at(const struct q3_topo *t, int i);
/* The node with that os index, or NULL. */
const struct q3_topo_node *q3_topo_node_os(const struct q3_topo *t, int os);

/* Distance from node a to node b (os indices) as the firmware reports it (SLIT: 10 local),
 * or, without a matrix, 10 for a == b, 20 within a package, 30 across. */
int q3_topo_distance(const struct q3_topo *t, int a, int b);

/* Every node's os index, nearest to `from` first (from itself, then by distance, then by os
 * index); from -1: ascending os order.  Returns the count (<= max). */
int q3_topo_node_order(const struct q3_topo *t, int from, int *order, int max);

/* One OS CPU per physical core of node os (-1: of the whole machine), ascending.  Returns the
 * count written (<= max). */
int q3_topo_node_cores(const struct q3_topo *t, int os, int *cpus, int max);

/* The locality of a PCI device, bus id "dddd:bb:dd.f" or "bb:dd.f" (any case).  0, or -ENOENT
 * when neither hwloc nor sysfs knows the device, -EINVAL for a malformed id. */
int q3_topo_pci_locality(const struct q3_topo *t, const char *busid, struct q3_locality *loc,
			 q3_err *e);

/* The locality of the block device holding the file system of path (the NVMe drive of the
 * model folder): its PCI device through sysfs (dev/block/MAJ:MIN), then as a PCI device.
 * 0 with node -1 / via "none" when the device has no PCI parent (a RAM disk, an overlay, no
 * sysfs). */
int q3_topo_path_locality(const struct q3_topo *t, const char *path, struct q3_locality *loc,
			  q3_err *e);
/* The same for block device major:minor. */
int q3_topo_blockdev_locality(const struct q3_topo *t, unsigned major, unsigned minor,
			      struct q3_locality *loc, q3_err *e);

/* Parses "0-3,8,10-11" into ascending unique CPU numbers.  Returns the count, or -EINVAL. */
int q3_parse_cpulist(const char *s, int *cpus, int max);
