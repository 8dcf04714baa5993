"""A stand-in for a person's browser in OAuth logins: `BROWSER="python3 .ci/oauth_browser.py %s"`.

llmhost opens the authorization URL with the standard library's webbrowser, which runs $BROWSER.
This GETs the URL and follows the authorization server's redirect to llmhost's loopback
listener, as a browser whose user is already logged in and consents would. Exit status 0 when
the listener answered 200."""
import sys
import urllib.error
import urllib.request


def main(url):
    try:
        with urllib.request.urlopen(url, timeout=30) as answer:
            answer.read()
    except (urllib.error.URLError, OSError) as exc:
        print(f"oauth_browser: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
