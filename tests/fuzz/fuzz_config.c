/* libFuzzer target: mailshiftd's configuration file (ms_dconfig_load(),
 * i.e. ms_ini_parse() and every section's key handling) on arbitrary
 * bytes. The input is written to a memfd and parsed through
 * /proc/self/fd/N, the way the daemon reads a file.
 *
 * Oracles besides the sanitizers: every key the INI layer hands over is
 * trimmed, non-empty and free of control characters; a failed parse says
 * why; a successful one has at least one listener, numbers in their
 * documented ranges and NUL-terminated strings. */
#include <assert.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "config.h"
#include "dconfig.h"

static int fd = -1;
static char path[64];

static int clean(const char *s)
{
	for (; *s != '\0'; s++)
		if ((unsigned char)*s < 0x20 && *s != '\t')
			return 0;
	return 1;
}

static int on_any(void *ctx, const char *section, const char *key,
		  const char *value, char *err, size_t errsz)
{
	assert(*section != '\0' && *key != '\0');
	assert(clean(section) && clean(key) && clean(value));
	assert(key[strlen(key) - 1] != ' ' && key[0] != ' ');
	assert(strlen(key) + strlen(value) < MS_INI_MAX_LINE);
	(*(unsigned int *)ctx)++;
	return 0;
}

static void check_loaded(const struct ms_dconfig *c)
{
	const struct ms_gw_config *g = &c->gw;

	assert(g->nlisten >= 1 && g->nlisten <= MS_GW_MAX_LISTEN);
	assert(g->ndomains <= MS_GW_MAX_DOMAINS);
	assert(g->hold_max_seconds <= 86400);
	assert(g->connections >= 1 && g->connections <= 64);
	assert(g->sweep_concurrency <= 1000 && g->sweep_rate <= 1000000);
	assert(g->sweep_interval <= 86400 && g->caps_refresh <= 86400);
	assert(g->sweep_from >= -1 && g->sweep_from < 24 * 60);
	assert(g->sweep_to >= -1 && g->sweep_to <= 24 * 60);
	assert(memchr(c->store, '\0', sizeof(c->store)) != NULL);
	assert(memchr(c->control, '\0', sizeof(c->control)) != NULL);
	assert(memchr(c->user, '\0', sizeof(c->user)) != NULL);
	for (unsigned int i = 0; i < g->nlisten; i++)
		assert(memchr(g->listen[i].addr, '\0',
			      sizeof(g->listen[i].addr)) != NULL);
	assert((g->cert[0] != '\0') == (g->key[0] != '\0'));
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	static struct ms_dconfig c;
	char err[1200];
	unsigned int nkeys = 0;

	if (fd < 0) {
		fd = memfd_create("fuzz_config", 0);
		assert(fd >= 0);
		snprintf(path, sizeof(path), "/proc/self/fd/%d", fd);
	}
	assert(ftruncate(fd, 0) == 0);
	assert(pwrite(fd, data, size, 0) == (ssize_t)size);

	err[0] = '\0';
	if (ms_ini_parse(path, on_any, &nkeys, err, sizeof(err)) < 0)
		assert(strncmp(err, path, strlen(path)) == 0);

	err[0] = '\0';
	if (ms_dconfig_load(path, &c, err, sizeof(err)) == 0)
		check_loaded(&c);
	else
		assert(err[0] != '\0');
	return 0;
}
