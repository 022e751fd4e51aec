/** @lifeboat/nbd: public API. */
export {};
