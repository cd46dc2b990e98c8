#ifndef MS_SUBCOMMANDS_H
#define MS_SUBCOMMANDS_H

extern const char *prog;

int migrate_main(int argc, char *argv[]);

#endif
