/* Mailbox names: modified UTF-7 (RFC 3501 5.1.3), hierarchy separator
 * translation between two servers, and IMAP date-time parsing. */
#ifndef MS_MAILBOX_H
#define MS_MAILBOX_H

#include <stddef.h>
#include <stdint.h>

/* Modified UTF-7 <-> UTF-8. Return a malloc'd string, or NULL when the input
 * is not valid (bad base64, bad UTF-16 surrogates, non-canonical encoding
 * such as an encoded printable ASCII character or "&-" missing, 8-bit bytes
 * in mUTF-7 input; invalid UTF-8 in UTF-8 input). */
char *ms_mutf7_to_utf8(const char *mutf7);
char *ms_utf8_to_mutf7(const char *utf8);
int ms_mutf7_is_valid(const char *mutf7);

/* Translates a mailbox name (mUTF-7) from the source hierarchy separator to
 * the destination's. A separator of 0 means a flat namespace. The name is
 * split on src_sep into components; a component that contains dst_sep (a
 * character the destination would read as a level break) has every dst_sep
 * written as "%XX" (upper-case hex) and every '%' as "%25"; other
 * components are kept byte for byte. "INBOX" in any case becomes "INBOX".
 * Returns a malloc'd string. */
char *ms_mailbox_translate(const char *name, char src_sep, char dst_sep);

/* Parses an IMAP date-time ("17-Jul-1996 02:44:25 -0700", day may be
 * space-padded) into epoch seconds (UTC). Returns 0 or -1. */
int ms_imap_date_parse(const char *s, int64_t *epoch_r);

/* Sorts and normalises a flag list: splits on spaces, drops \Recent,
 * removes duplicates (system flags compared case-insensitively), writes
 * them space-separated in byte order into out (size outsz). Returns 0, or
 * -1 when out is too small. */
int ms_flags_normalize(const char *flags, char *out, size_t outsz);

#endif
