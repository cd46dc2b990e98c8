#ifndef MS_SUBCOMMANDS_H
#define MS_SUBCOMMANDS_H

extern const char *prog;

int migrate_main(int argc, char *argv[]);
int status_main(int argc, char *argv[]);
int user_main(int argc, char *argv[]);
int sessions_main(int argc, char *argv[]);
int kick_main(int argc, char *argv[]);
int policy_main(int argc, char *argv[]);
int migrate_daemon_main(int argc, char *argv[]);
int rollback_main(int argc, char *argv[]);
int steer_main(int argc, char *argv[]);
int takeover_main(int argc, char *argv[]);
int giveback_main(int argc, char *argv[]);

#endif
